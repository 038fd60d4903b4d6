//! The query side over HTTP, with the worker's own model, prefixes and store:
//!
//! - `POST /embed`: text-embeddings-inference's API (`{"inputs": "…" | ["…"], "normalize":
//!   true, "truncate": false}` → `[[f32…]…]`; errors `{"error", "error_type"}`);
//! - `POST /v1/embeddings`: OpenAI's (`model`, `input` string or array, `encoding_format`
//!   float or base64; `usage` with token counts; errors `{"error": {"message", "type",
//!   "param", "code"}}`), so OpenAI's client libraries work by changing their base URL;
//! - `POST /search`: `{"query": "…", "top_k": 5, "filter": {"field": value},
//!   "group_by_document": false}` → `{"hits": [{"score", "id", "document_id", "payload"}]}`;
//! - `GET /info`: model, dimension, pooling, prefixes, input limit, store, collection.
//!
//! Inputs get the query prefix (`model.query_prefix`) unless the request names another:
//! `"prefix": "…"` or TEI's `"prompt_name": "query" | "document"`. Queries go to the
//! encoder's priority lane, ahead of ingestion batches (`embed::worker`).
//!
//! Limits answer at once: a body over `api.max_body_bytes` or more than
//! `api.max_inputs` inputs → 413; an input longer than the model reads → 413 unless
//! `truncate` is set; `api.max_concurrent` requests in flight → 429 with `Retry-After`;
//! the model still loading → 503. With `api.api_key` set, every query endpoint wants
//! `Authorization: Bearer <key>` (401 otherwise).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use crate::embed::worker::EncoderHandle;
use crate::embed::{ModelInfo, TextTokenizer};
use crate::metrics::Metrics;
use crate::search::Searcher;
use crate::settings::ApiSettings;
use crate::settings::SearchMode;
use crate::sink::{self, AnySink, MatchFilter, Sink};

/// What answers queries once the model and the store are ready.
pub struct Serving {
    pub encoder: EncoderHandle,
    /// The tokenizer with the document prefix; other prefixes are made from it.
    pub tokenizer: TextTokenizer,
    pub info: ModelInfo,
    pub prefix: String,
    pub query_prefix: String,
    pub sink: Arc<AnySink>,
    /// Turns a query text into the store's query (`search.*`, the sparse terms).
    pub searcher: crate::search::Searcher,
    pub store: String,
    pub collection: String,
}

/// Shared by the handlers; `serving` is set once the model and store are ready (until
/// then the query endpoints answer 503).
pub struct Api {
    settings: ApiSettings,
    serving: OnceLock<Serving>,
    slots: Arc<Semaphore>,
    metrics: Metrics,
}

impl Api {
    pub fn new(settings: ApiSettings, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(settings.max_concurrent.max(1))),
            settings,
            serving: OnceLock::new(),
            metrics,
        })
    }

    /// Opens the endpoints (once).
    pub fn set_serving(&self, s: Serving) {
        let _ = self.serving.set(s);
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/embed", post(embed_tei))
            .route("/v1/embeddings", post(embed_openai))
            .route("/search", post(search))
            .route("/info", get(info))
            .layer(DefaultBodyLimit::max(self.settings.max_body_bytes))
            .with_state(self.clone())
    }
}

/// The two error shapes.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Tei,
    OpenAi,
}

struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

fn err(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        kind,
        message: message.into(),
    }
}

impl ApiError {
    fn into_response(self, shape: Shape) -> Response {
        let body = match shape {
            Shape::Tei => json!({"error": self.message, "error_type": self.kind}),
            Shape::OpenAi => json!({"error": {
                "message": self.message,
                "type": if self.status == StatusCode::UNAUTHORIZED { "invalid_request_error" } else { self.kind },
                "param": null,
                "code": if self.status == StatusCode::UNAUTHORIZED { json!("invalid_api_key") } else { Value::Null },
            }}),
        };
        let mut r = (self.status, json_body(body)).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn json_body(v: Value) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        v.to_string(),
    )
        .into_response()
}

/// Admission: the key, a free slot, a ready model. The permit is held for the request.
fn admit<'a>(
    api: &'a Api,
    headers: &HeaderMap,
) -> Result<(&'a Serving, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let key = api.settings.api_key.expose();
    if !key.is_empty() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "missing or wrong API key (Authorization: Bearer <api.api_key>)",
            ));
        }
    }
    let permit = api.slots.clone().try_acquire_owned().map_err(|_| {
        err(
            StatusCode::TOO_MANY_REQUESTS,
            "Overloaded",
            format!(
                "{} requests are in flight (api.max_concurrent); retry shortly",
                api.settings.max_concurrent
            ),
        )
    })?;
    let serving = api.serving.get().ok_or_else(|| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unhealthy",
            "the model is loading",
        )
    })?;
    Ok((serving, permit))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_body(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Validation",
                "request body larger than api.max_body_bytes",
            )
        } else {
            err(StatusCode::BAD_REQUEST, "Validation", e.body_text())
        }
    })?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Validation",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Validation",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// `field` as a list of texts: a string or an array of strings, within `max_inputs`.
fn texts(o: &Map<String, Value>, field: &str, max_inputs: usize) -> Result<Vec<String>, ApiError> {
    let bad = |m: String| err(StatusCode::UNPROCESSABLE_ENTITY, "Validation", m);
    let list = match o.get(field) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(bad(format!(
                    "`{field}` must hold strings (token ids are not accepted), got {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(format!(
                "`{field}` must be a string or an array of strings, got {other}"
            )))
        }
        None => return Err(bad(format!("`{field}` is missing"))),
    };
    if list.is_empty() {
        return Err(bad(format!("`{field}` is empty")));
    }
    if list.len() > max_inputs {
        return Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Validation",
            format!(
                "batch size {} > maximum allowed batch size {max_inputs} (api.max_inputs)",
                list.len()
            ),
        ));
    }
    if let Some(i) = list.iter().position(|t| t.trim().is_empty()) {
        return Err(bad(format!("`{field}`[{i}] is empty")));
    }
    Ok(list)
}

fn flag(o: &Map<String, Value>, k: &str, default: bool) -> Result<bool, ApiError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Validation",
            format!("`{k}` must be a boolean, got {other}"),
        )),
    }
}

/// The prefix a request asks for: `prefix`, or TEI's `prompt_name`, else the query prefix.
fn prefix_of<'a>(o: &'a Map<String, Value>, s: &'a Serving) -> Result<&'a str, ApiError> {
    let bad = |m: String| err(StatusCode::UNPROCESSABLE_ENTITY, "Validation", m);
    if let Some(v) = o.get("prefix") {
        return v
            .as_str()
            .ok_or_else(|| bad(format!("`prefix` must be a string, got {v}")));
    }
    match o.get("prompt_name").and_then(Value::as_str) {
        None => Ok(&s.query_prefix),
        Some("query") => Ok(&s.query_prefix),
        Some("document" | "passage") => Ok(&s.prefix),
        Some(other) => Err(bad(format!(
            "`prompt_name` {other:?}: use \"query\" or \"document\""
        ))),
    }
}

/// Tokenises and embeds `inputs` in the priority lane. Returns the vectors and the tokens
/// counted.
async fn embed_inputs(
    api: &Api,
    s: &Serving,
    inputs: &[String],
    prefix: &str,
    truncate: bool,
    normalize: bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let tok = s.tokenizer.with_prefix(prefix);
    let mut seqs = Vec::with_capacity(inputs.len());
    let mut tokens = 0;
    for (i, t) in inputs.iter().enumerate() {
        let t = tok.tokenize(t).map_err(|e| {
            err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Tokenizer",
                format!("input {i}: {e}"),
            )
        })?;
        if t.truncated && !truncate {
            return Err(err(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Validation",
                format!(
                    "input {i} is longer than the model reads ({} tokens); shorten it or set \"truncate\": true",
                    s.info.max_seq_length
                ),
            ));
        }
        tokens += t.ids.len();
        seqs.push(t.ids);
    }
    let (mut vectors, waited) = s.encoder.embed_query(seqs).await.map_err(|e| {
        err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Backend",
            format!("the encoder failed: {e}"),
        )
    })?;
    api.metrics
        .query_queue_seconds
        .observe(waited.as_secs_f64());
    if normalize {
        for v in &mut vectors {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n > 0.0 {
                v.iter_mut().for_each(|x| *x /= n);
            }
        }
    }
    Ok((vectors, tokens))
}

/// Counts and times a request.
fn finish(
    api: &Api,
    endpoint: &str,
    started: Instant,
    r: Result<Response, (ApiError, Shape)>,
) -> Response {
    let response = match r {
        Ok(r) => r,
        Err((e, shape)) => e.into_response(shape),
    };
    let status = response.status().as_u16().to_string();
    api.metrics
        .http_requests
        .with_label_values(&[endpoint, &status])
        .inc();
    api.metrics
        .query_seconds
        .with_label_values(&[endpoint])
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn embed_tei(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let r = async {
        let (s, _permit) = admit(&api, &headers)?;
        let o = parse_body(body)?;
        let inputs = texts(&o, "inputs", api.settings.max_inputs)?;
        let normalize = flag(&o, "normalize", true)?;
        let truncate = flag(&o, "truncate", false)?;
        let prefix = prefix_of(&o, s)?;
        let (vectors, _) = embed_inputs(&api, s, &inputs, prefix, truncate, normalize).await?;
        Ok(json_body(json!(vectors)))
    }
    .await;
    finish(&api, "embed", started, r.map_err(|e| (e, Shape::Tei)))
}

async fn embed_openai(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let r = async {
        let (s, _permit) = admit(&api, &headers)?;
        let o = parse_body(body)?;
        let inputs = texts(&o, "input", api.settings.max_inputs)?;
        let base64 = match o.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("encoding_format {other:?}: use \"float\" or \"base64\""),
                ))
            }
        };
        if let Some(d) = o.get("dimensions").and_then(Value::as_u64) {
            if d as usize != s.info.dim {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!(
                        "this model makes {}-dimension vectors; `dimensions` {d} is not supported",
                        s.info.dim
                    ),
                ));
            }
        }
        let truncate = flag(&o, "truncate", false)?;
        let prefix = prefix_of(&o, s)?;
        let (vectors, tokens) = embed_inputs(&api, s, &inputs, prefix, truncate, true).await?;
        let data: Vec<Value> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(v)
                };
                json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        Ok(json_body(json!({
            "object": "list",
            "data": data,
            "model": o.get("model").and_then(Value::as_str).unwrap_or(&s.info.name),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })))
    }
    .await;
    // OpenAI's clients read 4xx bodies as `{"error": {...}}`; its type for bad input is
    // invalid_request_error.
    let r = r.map_err(|mut e| {
        if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
            e.kind = "invalid_request_error";
            if e.status == StatusCode::UNPROCESSABLE_ENTITY {
                e.status = StatusCode::BAD_REQUEST;
            }
        }
        (e, Shape::OpenAi)
    });
    finish(&api, "v1_embeddings", started, r)
}

async fn search(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let r = async {
        let (s, _permit) = admit(&api, &headers)?;
        let o = parse_body(body)?;
        let bad = |m: String| err(StatusCode::UNPROCESSABLE_ENTITY, "Validation", m);
        let field = if o.contains_key("query") {
            "query"
        } else {
            "text"
        };
        let query = match o.get(field) {
            Some(Value::String(q)) if !q.trim().is_empty() => q.clone(),
            Some(Value::String(_)) => return Err(bad(format!("`{field}` is empty"))),
            Some(other) => return Err(bad(format!("`{field}` must be a string, got {other}"))),
            None => return Err(bad("`query` is missing".into())),
        };
        let top_k = match o.get("top_k") {
            None => 5,
            Some(v) => match v.as_u64() {
                Some(k) if (1..=1000).contains(&k) => k as usize,
                _ => {
                    return Err(bad(format!(
                        "`top_k` must be an integer from 1 to 1000, got {v}"
                    )))
                }
            },
        };
        let filter: Option<MatchFilter> = match o.get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::Object(f)) => {
                let mut conds = Vec::new();
                for (k, v) in f {
                    if !(v.is_string() || v.is_boolean() || v.is_i64()) {
                        return Err(bad(format!(
                            "`filter.{k}` must be a string, an integer or a boolean, got {v}"
                        )));
                    }
                    conds.push((k.clone(), v.clone()));
                }
                Some(conds)
            }
            Some(other) => {
                return Err(bad(format!(
                    "`filter` must be an object of field: value, got {other}"
                )))
            }
        };
        let grouped = flag(&o, "group_by_document", false)?;
        let truncate = flag(&o, "truncate", true)?;
        let prefix = prefix_of(&o, s)?;
        let requested = match o.get("mode") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => Some(SearchMode::parse(m).ok_or_else(|| {
                bad(format!(
                    "`mode` {m:?}: use \"dense\", \"sparse\", \"hybrid\" or \"auto\""
                ))
            })?),
            Some(other) => return Err(bad(format!("`mode` must be a string, got {other}"))),
        };
        let mode = s.searcher.mode(requested).map_err(bad)?;
        let vector = if Searcher::needs_dense(mode) {
            let (mut v, _) = embed_inputs(
                &api,
                s,
                std::slice::from_ref(&query),
                prefix,
                truncate,
                false,
            )
            .await?;
            v.pop()
        } else {
            None
        };
        let q = s.searcher.query(mode, &query, vector, top_k);
        let hits = if grouped {
            sink::search_documents(s.sink.as_ref(), q, top_k, filter).await
        } else {
            s.sink.search(q, top_k, filter).await
        };
        let hits = hits.map_err(|e| match e {
            sink::SinkError::Rejected { detail, .. } => bad(detail),
            e => err(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unhealthy",
                format!("the store failed: {e}"),
            ),
        })?;
        let hits: Vec<Value> = hits
            .into_iter()
            .map(|h| {
                json!({
                    "score": h.score,
                    "id": h.id,
                    "document_id": sink::document_of(&h),
                    "payload": h.payload,
                })
            })
            .collect();
        Ok(json_body(json!({ "hits": hits })))
    }
    .await;
    finish(&api, "search", started, r.map_err(|e| (e, Shape::Tei)))
}

async fn info(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let r = admit(&api, &headers).map(|(s, _permit)| {
        json_body(json!({
            "model_id": s.info.name,
            "model_dtype": s.info.precision.as_str(),
            "dimension": s.info.dim,
            "pooling": s.info.pooling.as_str(),
            "normalize": s.info.normalize,
            "max_input_length": s.info.max_seq_length,
            "prefix": s.prefix,
            "query_prefix": s.query_prefix,
            "max_client_batch_size": api.settings.max_inputs,
            "max_concurrent_requests": api.settings.max_concurrent,
            "store": s.store,
            "collection": s.collection,
            "sparse": s.searcher.lexer().map(|l| json!({"name": l.name(), "terms": l.source().name()})),
            "search_modes": if s.searcher.lexer().is_some() { json!(["dense", "sparse", "hybrid"]) } else { json!(["dense"]) },
            "version": env!("CARGO_PKG_VERSION"),
        }))
    });
    finish(&api, "info", started, r.map_err(|e| (e, Shape::Tei)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_concurrent: usize, key: &str) -> ApiSettings {
        serde_json::from_value(json!({
            "enabled": true,
            "api_key": key,
            "max_inputs": 4,
            "max_body_bytes": 4096,
            "max_concurrent": max_concurrent,
        }))
        .unwrap()
    }

    #[test]
    fn admission_checks_the_key_then_the_slots_then_readiness() {
        let api = Api::new(settings(1, "k"), Metrics::new());
        let mut h = HeaderMap::new();
        let status = |r: Result<_, ApiError>| r.err().map(|e| e.status);
        assert_eq!(
            status(admit(&api, &h).map(|_| ())),
            Some(StatusCode::UNAUTHORIZED)
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        // Not loaded yet: 503.
        assert_eq!(
            status(admit(&api, &h).map(|_| ())),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        // One slot, taken: 429 with Retry-After.
        let held = api.slots.clone().try_acquire_owned().unwrap();
        let e = admit(&api, &h).map(|_| ()).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response(Shape::OpenAi);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        drop(held);
        assert_eq!(
            status(admit(&api, &h).map(|_| ())),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
    }

    #[test]
    fn texts_are_validated_with_clear_statuses() {
        let o = |v: Value| v.as_object().unwrap().clone();
        let code = |v: Value| texts(&o(v), "inputs", 2).err().map(|e| e.status);
        assert_eq!(code(json!({"inputs": "가"})), None);
        assert_eq!(code(json!({"inputs": ["가", "나"]})), None);
        assert_eq!(
            code(json!({"inputs": ["가", "나", "다"]})),
            Some(StatusCode::PAYLOAD_TOO_LARGE)
        );
        assert_eq!(
            code(json!({"inputs": []})),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!(
            code(json!({"inputs": [1]})),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!(
            code(json!({"inputs": " "})),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        assert_eq!(code(json!({})), Some(StatusCode::UNPROCESSABLE_ENTITY));
    }
}
