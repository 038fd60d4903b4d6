//! Hybrid retrieval (issue 14) through both stores: Qdrant's engine in process and Qdrant
//! over gRPC (the test server, or a real Qdrant with `QDRANT_URL`), with the real model,
//! the real backfill pipeline and the `search` command.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use streambed::sink::embedded::EmbeddedSink;
use streambed::sink::qdrant::QdrantSink;
use streambed::sink::{Point, Query, Sink, SinkError, SparseVector, Write};
use support::*;
use uuid::Uuid;

/// The code only one document holds; others hold codes one character away.
const CODE: &str = "KR-7731-ㄱ";
/// A code deep inside a long document, in a chunk after the first.
const DEEP_CODE: &str = "ZX-4096-ㅎ";

fn corpus(dir: &Path) -> std::path::PathBuf {
    let mut lines = Vec::new();
    for (i, s) in korean_sentences(40).into_iter().enumerate() {
        lines.push(json!({"id": format!("s{i}"), "text": s}));
    }
    let target = format!("제품 코드 {CODE} 의 반품은 구매 후 14일 안에 신청할 수 있습니다.");
    lines.push(json!({"id": "target", "text": target}));
    for (i, code) in ["KR-7731-ㄴ", "KR-7713-ㄱ", "KR-1377-ㄱ", "KP-7731-ㄱ"]
        .iter()
        .enumerate()
    {
        lines.push(json!({"id": format!("near{i}"), "text": format!("제품 코드 {code} 의 반품은 구매 후 14일 안에 신청할 수 있습니다.")}));
    }
    let mut long: Vec<String> = korean_sentences(160)[40..].to_vec();
    long.insert(100, format!("부품 번호 {DEEP_CODE} 는 따로 주문해야 한다."));
    lines.push(json!({"id": "long", "text": long.join(" ")}));
    let path = dir.join("corpus.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

fn base_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        (
            "STREAMBED__MODEL__PATH".into(),
            e5_model().to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__EMBEDDED__PATH".into(),
            dir.join("store").to_string_lossy().into_owned(),
        ),
        ("STREAMBED__METRICS__ADDR".into(), String::new()),
        ("STREAMBED__CHUNK__MAX_TOKENS".into(), "128".into()),
        ("STREAMBED__SPARSE__ENABLED".into(), "true".into()),
    ]
}

fn backfill(dir: &Path, env: &[(String, String)]) {
    let out = Command::new(env!("CARGO_BIN_EXE_streambed"))
        .args(["backfill", "--input"])
        .arg(corpus(dir))
        .arg("--checkpoint")
        .arg(dir.join(format!("cp-{}.json", Uuid::new_v4().simple())))
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// `streambed search` hits: (id of the message, chunk index, text).
fn search(env: &[(String, String)], mode: &str, query: &str, grouped: bool) -> Vec<Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_streambed"));
    cmd.args(["search", "--top-k", "3", "--mode", mode, query]);
    if grouped {
        cmd.arg("--group-by-document");
    }
    let out = cmd.envs(env.iter().cloned()).output().unwrap();
    assert!(out.status.success(), "{mode}: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn text_of(hit: &Value) -> String {
    hit["payload"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// What both stores must show.
fn exact_codes_are_found(env: &[(String, String)]) {
    backfill(env_dir(env), env);
    for mode in ["sparse", "hybrid"] {
        let hits = search(env, mode, CODE, false);
        assert!(
            text_of(&hits[0]).contains(CODE),
            "{mode}: top hit {:?}",
            hits.iter().map(text_of).collect::<Vec<_>>()
        );
        // The code inside a long document: found in its own chunk, the document once.
        let hits = search(env, mode, DEEP_CODE, true);
        assert!(text_of(&hits[0]).contains(DEEP_CODE), "{mode}: {hits:?}");
        assert!(hits[0]["payload"]["chunk_index"].as_u64().unwrap() > 0);
        let docs: Vec<&Value> = hits.iter().map(|h| &h["document_id"]).collect();
        assert_eq!(
            docs.len(),
            docs.iter().collect::<std::collections::HashSet<_>>().len()
        );
    }
    // Dense search still works on the same collection (it need not find the code).
    let dense = search(env, "dense", "반품 신청 기간", false);
    assert_eq!(dense.len(), 3);
    // A query with no terms at all finds nothing lexically, without an error.
    assert!(search(env, "sparse", "😀 !!", false).is_empty());
}

fn env_dir(env: &[(String, String)]) -> &Path {
    let store = &env
        .iter()
        .find(|(k, _)| k == "STREAMBED__EMBEDDED__PATH")
        .unwrap()
        .1;
    Path::new(store).parent().unwrap()
}

#[test]
fn an_exact_code_is_found_by_sparse_and_hybrid_search_in_the_embedded_store() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut env = base_env(dir.path());
    exact_codes_are_found(&env);

    // The same through the HTTP API of `streambed serve`.
    let addr = format!("127.0.0.1:{}", free_port());
    env.retain(|(k, _)| k != "STREAMBED__METRICS__ADDR");
    env.push(("STREAMBED__METRICS__ADDR".into(), addr.clone()));
    let mut w = Worker::spawn(&["serve"], &env, &dir.path().join("serve.log"));
    w.metrics_addr = addr.clone();
    let post = |body: Value| -> Value {
        let out = Command::new("curl")
            .args(["-sS", "-X", "POST", "-H", "Content-Type: application/json"])
            .args(["-d", &body.to_string(), &format!("http://{addr}/search")])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    wait_until("the query API", std::time::Duration::from_secs(60), || {
        post(json!({"query": "x", "mode": "sparse"}))["hits"].is_array()
    });
    for mode in ["sparse", "hybrid"] {
        let r = post(json!({"query": CODE, "mode": mode, "top_k": 3}));
        let top = r["hits"][0]["payload"]["text"].as_str().unwrap_or_default();
        assert!(top.contains(CODE), "{mode}: {r}");
    }
    let r = post(json!({"query": DEEP_CODE, "mode": "hybrid", "group_by_document": true}));
    assert!(r["hits"][0]["payload"]["text"]
        .as_str()
        .unwrap()
        .contains(DEEP_CODE));
    // A payload filter holds in both legs: the deep code's chunk is not a first chunk, so
    // the sparse search finds nothing and the hybrid one only what the dense leg finds.
    for mode in ["sparse", "hybrid"] {
        let r = post(
            json!({"query": DEEP_CODE, "mode": mode, "top_k": 5, "filter": {"chunk_index": 0}}),
        );
        let hits = r["hits"].as_array().unwrap();
        assert_eq!(hits.is_empty(), mode == "sparse", "{mode}: {r}");
        for h in hits {
            assert_eq!(h["payload"]["chunk_index"], 0, "{mode}: {r}");
            assert!(!h["payload"]["text"].as_str().unwrap().contains(DEEP_CODE));
        }
    }
    w.stop();
}

#[test]
fn an_exact_code_is_found_by_sparse_and_hybrid_search_in_qdrant() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let q = QdrantUnderTest::start(dir.path());
    let mut env = base_env(dir.path());
    env.extend(q.worker_env(&unique("hybrid")));
    exact_codes_are_found(&env);
}

fn point(i: u32, sparse: Option<SparseVector>) -> Point {
    let mut vector = vec![0.0; 8];
    vector[i as usize % 8] = 1.0;
    Point {
        id: Uuid::from_u128(u128::from(i) + 1),
        vector,
        sparse,
        payload: json!({"text": format!("문장 {i}")})
            .as_object()
            .unwrap()
            .clone(),
    }
}

/// A collection made without sparse vectors (as every collection before them) keeps
/// working dense-only; opened with sparse vectors on, it is refused with what to do.
/// `open(sparse)` opens the one collection (each is dropped before the next is opened: the
/// embedded store is one process's at a time).
async fn dense_only_collections_keep_working<S: Sink>(open: impl Fn(Option<&str>) -> S) {
    let old = open(None);
    old.ensure_collection(8).await.unwrap();
    old.write(Write {
        upserts: (0..4).map(|i| point(i, None)).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(old);
    let reopened = open(None);
    reopened.ensure_collection(8).await.unwrap();
    let mut v = vec![0.0; 8];
    v[2] = 1.0;
    let hits = reopened.search(Query::Dense(v), 1, None).await.unwrap();
    assert_eq!(hits[0].payload["text"], "문장 2");
    match reopened
        .search(Query::Sparse(SparseVector::from_pairs([(1, 1.0)])), 1, None)
        .await
    {
        Err(SinkError::Rejected { detail, .. }) => assert!(detail.contains("sparse.enabled")),
        other => panic!("{other:?}"),
    }
    drop(reopened);
    match open(Some("bm25")).ensure_collection(8).await {
        Err(SinkError::Permanent(m)) => {
            assert!(m.contains("sparse.enabled = false"), "{m}");
            assert!(m.contains("bm25"), "{m}");
        }
        other => panic!("{other:?}"),
    }
}

/// Points with and without a sparse vector live in one collection; sparse search ranks
/// by BM25 with the store's IDF (the rarer shared term wins).
async fn sparse_and_dense_points_mix<S: Sink>(sink: S) {
    sink.ensure_collection(8).await.unwrap();
    let common = 7u32;
    let rare = 99u32;
    let mut points: Vec<Point> = (0..6)
        .map(|i| point(i, Some(SparseVector::from_pairs([(common, 1.0)]))))
        .collect();
    points.push(point(6, Some(SparseVector::from_pairs([(rare, 1.0)]))));
    points.push(point(7, None));
    sink.write(Write {
        upserts: points,
        ..Default::default()
    })
    .await
    .unwrap();
    let q = SparseVector::from_pairs([(common, 1.0), (rare, 1.0)]);
    let hits = sink.search(Query::Sparse(q), 8, None).await.unwrap();
    assert_eq!(hits[0].payload["text"], "문장 6", "{hits:?}");
    assert_eq!(
        hits.len(),
        7,
        "the point without a sparse vector is not a sparse hit"
    );
    assert!(hits[0].score > hits[1].score);
    assert_eq!(sink.count().await.unwrap(), 8);
    // Reading a point back gives its dense vector (named "" beside the sparse one).
    let got = sink.retrieve(vec![Uuid::from_u128(7)], true).await.unwrap();
    assert_eq!(got[0].vector.as_ref().unwrap()[6], 1.0);
}

#[tokio::test]
async fn the_embedded_store_keeps_dense_only_collections_and_mixes_sparse_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old");
    dense_only_collections_keep_working(|sparse| {
        EmbeddedSink::open(path.clone(), sparse.map(str::to_string))
    })
    .await;
    sparse_and_dense_points_mix(EmbeddedSink::open(
        dir.path().join("new"),
        Some("bm25".into()),
    ))
    .await;
}

#[tokio::test]
async fn qdrant_keeps_dense_only_collections_and_mixes_sparse_points() {
    let dir = tempfile::tempdir().unwrap();
    let q = QdrantUnderTest::start(dir.path());
    let sink = |collection: &str, sparse: Option<&str>| {
        let mut cfg = streambed::settings::QdrantSettings {
            url: q.url.clone(),
            collection: collection.to_string(),
            api_key: Default::default(),
            timeout_ms: 10_000,
            max_request_bytes: 4 * 1024 * 1024,
        };
        if let Some(k) = &q.api_key {
            cfg.api_key = serde_json::from_value(json!(k)).unwrap();
        }
        QdrantSink::connect(&cfg, sparse.map(str::to_string)).unwrap()
    };
    let old = unique("old");
    dense_only_collections_keep_working(|sparse| sink(&old, sparse)).await;
    sparse_and_dense_points_mix(sink(&unique("new"), Some("bm25"))).await;
}
