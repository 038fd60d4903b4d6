//! The Qdrant sink over real gRPC with the real `qdrant-client`: against streambed's
//! Qdrant-protocol test server (qdrant-edge behind qdrant-client's own server traits), or
//! a real Qdrant when `QDRANT_URL` is set.

mod support;

use std::time::Duration;

use serde_json::json;
use streambed::settings::{QdrantSettings, Secret};
use streambed::sink::qdrant::QdrantSink;
use streambed::sink::{ChunkRange, Point, Query, Sink, SinkError, Write};
use support::*;
use uuid::Uuid;

fn settings(url: &str, collection: &str) -> QdrantSettings {
    QdrantSettings {
        url: url.to_string(),
        collection: collection.to_string(),
        api_key: Secret::default(),
        timeout_ms: 5000,
        max_request_bytes: 4 * 1024 * 1024,
    }
}

/// Resident memory of a process, from /proc.
fn rss_mb(pid: i32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn unit(dim: usize, hot: usize) -> Vec<f32> {
    let mut v = vec![0.0; dim];
    v[hot] = 1.0;
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn qdrant_sink_round_trip_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let q = tokio::task::spawn_blocking({
        let p = dir.path().to_path_buf();
        move || QdrantUnderTest::start(&p)
    })
    .await
    .unwrap();
    let collection = unique("c");
    let mut cfg = settings(&q.url, &collection);
    if let Some(k) = &q.api_key {
        cfg.api_key = serde_json::from_value(json!(k)).unwrap();
    }
    let sink = QdrantSink::connect(&cfg, None).unwrap();
    assert!(sink.ping().await.is_err(), "no collection yet: not healthy");
    sink.ensure_collection(8).await.unwrap();
    sink.ensure_collection(8).await.unwrap(); // idempotent
    sink.ping().await.unwrap();

    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let points = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Point {
            id: *id,
            vector: unit(8, i),
            sparse: None,
            payload: json!({"text": format!("문장 {i} 😀"), "n": i})
                .as_object()
                .unwrap()
                .clone(),
        })
        .collect();
    sink.write(Write {
        upserts: points,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(sink.count().await.unwrap(), 3);

    let hits = sink
        .search(Query::Dense(unit(8, 1)), 2, None)
        .await
        .unwrap();
    assert_eq!(hits[0].id, ids[1].to_string());
    assert!((hits[0].score - 1.0).abs() < 1e-5);
    assert_eq!(hits[0].payload["text"], "문장 1 😀");

    let got = sink.retrieve(vec![ids[2]], true).await.unwrap();
    assert_eq!(got[0].payload["n"], 2);
    assert_eq!(got[0].vector.as_deref(), Some(unit(8, 2).as_slice()));

    // A replay of the same id overwrites; a delete removes.
    let again = Point {
        id: ids[0],
        vector: unit(8, 7),
        sparse: None,
        payload: json!({"text": "덮어쓰기"}).as_object().unwrap().clone(),
    };
    sink.write(Write {
        upserts: vec![again],
        deletes: vec![ids[1]],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(sink.count().await.unwrap(), 2);
    let got = sink.retrieve(vec![ids[0]], false).await.unwrap();
    assert_eq!(got[0].payload["text"], "덮어쓰기");
    assert_eq!(got[0].vector, None, "no vector unless asked");
    document_chunks_are_replaced_and_removed(&sink).await;

    // The same collection for a model of another dimension is refused with the fix.
    match QdrantSink::connect(&cfg, None)
        .unwrap()
        .ensure_collection(768)
        .await
    {
        Err(SinkError::Permanent(m)) => {
            assert!(m.contains("768") && m.contains("qdrant.collection"), "{m}")
        }
        other => panic!("expected a permanent mismatch error, got {other:?}"),
    }
    drop(q);
}

/// The store goes away mid-stream and comes back: nothing is committed past what is
/// stored meanwhile, /readyz says not ready, memory stays bounded while a backlog far larger
/// than librdkafka's prefetch limit (16 MiB) waits, and the worker recovers on its own.
#[test]
fn worker_survives_a_qdrant_outage() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut q = QdrantUnderTest::start(dir.path());
    if q.real {
        eprintln!("QDRANT_URL is set: the outage needs the restartable test server (a real Qdrant is not killed by tests); skipped");
        return;
    }
    let broker = Broker::start();
    let topic = unique("events");
    let group = unique("group");
    let collection = unique("c");
    broker.create_topic(&topic, 3);
    // ~12 KB per message (a pad field the worker does not keep): 6000 of them are a
    // 70 MB backlog, four times the prefetch bound.
    let pad = "가".repeat(4000);
    let sentences = korean_sentences(6000);
    let msgs: Vec<Msg> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let id = format!("q-{i}");
            (
                Some(id.clone().into_bytes()),
                Some(
                    json!({"id": id, "text": s, "pad": pad})
                        .to_string()
                        .into_bytes(),
                ),
            )
        })
        .collect();
    let mut ends = broker.produce(&topic, &msgs[..800]);

    let mut env = worker_env(&broker, &topic, &group, &dir.path().join("unused"));
    env.extend(q.worker_env(&collection));
    env.push(("STREAMBED__SINK__RETRY_MAX_MS".into(), "1000".into()));
    let mut worker = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    wait_until(
        "progress before the outage",
        Duration::from_secs(120),
        || {
            worker
                .metric_opt("streambed_points_upserted_total")
                .is_some_and(|v| v >= 200.0)
        },
    );

    q.down();
    let outage_started = std::time::Instant::now();
    let stored_at_outage = q.read_offline(&collection, 384).len();
    for (p, end) in broker.produce(&topic, &msgs[800..]) {
        ends.insert(p, end);
    }
    let backlog_mb = msgs[800..]
        .iter()
        .map(|(_, v)| v.as_ref().map_or(0, Vec::len))
        .sum::<usize>() as f64
        / 1e6;
    wait_until(
        "/readyz to report the outage",
        Duration::from_secs(30),
        || {
            worker
                .http("/readyz")
                .is_some_and(|(s, body)| s == 503 && body.contains("vector store"))
        },
    );
    wait_until("write retries", Duration::from_secs(30), || {
        worker.metric("streambed_sink_retries_total") >= 2.0
    });
    // The outage lasts OUTAGE_SECONDS (30 by default) in all. Meanwhile the reader must stop
    // taking records (bounded memory) and nothing may be committed past the stored data.
    let outage: u64 = std::env::var("OUTAGE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let rss_start = rss_mb(worker.pid());
    let mut rss_max = rss_start;
    while outage_started.elapsed() < Duration::from_secs(outage) {
        std::thread::sleep(Duration::from_secs(1));
        rss_max = rss_max.max(rss_mb(worker.pid()));
        let committed: i64 = broker.committed(&group, &topic, 3).values().sum();
        assert!(
            committed as usize <= stored_at_outage,
            "committed {committed} offsets but only {stored_at_outage} points were stored"
        );
        assert_eq!(
            worker.http("/readyz").map(|r| r.0),
            Some(503),
            "not ready during the outage"
        );
    }
    let consumed = worker.metric("streambed_messages_consumed_total");
    eprintln!(
        "outage: {:.0} s, backlog {backlog_mb:.0} MB, rss at first retry {rss_start:.0} MB, max {rss_max:.0} MB, \
         stored before {stored_at_outage}, consumed {consumed}, retries {}",
        outage_started.elapsed().as_secs_f64(),
        worker.metric("streambed_sink_retries_total")
    );
    assert!(
        consumed < msgs.len() as f64,
        "the reader stopped taking records while the store was down ({consumed} of {})",
        msgs.len()
    );
    assert!(
        rss_max - rss_start < 60.0,
        "memory stays bounded during the outage with a {backlog_mb:.0} MB backlog: {rss_start:.0} MB -> {rss_max:.0} MB"
    );

    q.up();
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(300));
    wait_until(
        "/readyz 200 after recovery",
        Duration::from_secs(10),
        || worker.http("/readyz").map(|r| r.0) == Some(200),
    );
    worker.stop();
    let points = q.read_collection(&collection, 384);
    assert_eq!(
        points.len(),
        msgs.len(),
        "every message stored once after recovery"
    );
}

/// 64 messages of ~900 KB of Korean text each, in one partition, through a Qdrant-protocol
/// server that refuses requests over 4 MiB (as gRPC proxies do): the worker splits its
/// upserts to fit, so every message is stored, and the partition moves on in bounded time.
/// Then the same with the worker told a limit larger than the path allows: the refusals
/// are isolated by bisection and everything is still written.
#[test]
fn big_batches_are_split_to_the_request_limit_and_never_stall() {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(1);
    let q = QdrantUnderTest::start_with(dir.path(), 4 * 1024 * 1024, None);
    let sentences = korean_sentences(400);
    let msgs: Vec<Msg> = (0..64)
        .map(|i| {
            // ~300k Hangul syllables and spaces: ~900 KB of UTF-8.
            let mut text = String::new();
            let mut k = i;
            while text.len() < 900_000 {
                text.push_str(&sentences[k % sentences.len()]);
                text.push(' ');
                k += 1;
            }
            let id = format!("big-{i}");
            (
                Some(id.clone().into_bytes()),
                Some(json!({"id": id, "text": text}).to_string().into_bytes()),
            )
        })
        .collect();
    let ends = support::produce_with(
        &broker.addr,
        &topic,
        &msgs,
        &[("message.max.bytes", "2000000")],
    );
    for (phase, limit) in [("fits", "4194304"), ("too-big", "16777216")] {
        let collection = unique(phase);
        let group = format!("{group}-{phase}");
        let mut env = worker_env(&broker, &topic, &group, &dir.path().join("unused"));
        env.extend(q.worker_env(&collection));
        env.push(("STREAMBED__QDRANT__MAX_REQUEST_BYTES".into(), limit.into()));
        env.push(("STREAMBED__BATCH__MAX_ITEMS".into(), "64".into()));
        env.push(("STREAMBED__BATCH__MAX_TOKENS".into(), "65536".into()));
        // One ~900 KB point per message (split mode would make each a thousand chunks).
        env.push(("STREAMBED__CHUNK__MODE".into(), "truncate".into()));
        let started = std::time::Instant::now();
        let mut w = Worker::spawn(&["run"], &env, &dir.path().join(format!("{phase}.log")));
        broker.wait_committed(&group, &topic, &ends, Duration::from_secs(300));
        let took = started.elapsed();
        let dead = w.metric("streambed_messages_dead_lettered_total");
        let upserted = w.metric("streambed_points_upserted_total");
        let rejected = w.metric("streambed_sink_errors_total");
        w.stop();
        let points = q.read_collection(&collection, 384);
        eprintln!(
            "big batch ({phase}, worker limit {limit}): {} stored, {dead} dead-lettered, {rejected} refused writes, {:.1} s",
            points.len(),
            took.as_secs_f64()
        );
        assert_eq!(
            upserted as usize + dead as usize,
            64,
            "each stored or dead-lettered"
        );
        assert_eq!(
            points.len(),
            64,
            "each ~900 KB point fits a 4 MiB request alone"
        );
        for (_, p) in points.iter().take(3) {
            assert!(p.payload["text"].as_str().unwrap().len() >= 900_000);
        }
        if phase == "too-big" {
            assert!(rejected >= 1.0, "the server refused the oversized requests");
        }
    }
}

/// Behaviour the worker relies on, checked against the test server (and a real Qdrant when
/// QDRANT_URL is set, where the server's own settings allow): wrong dimension on search is
/// InvalidArgument naming the dimension, an oversized request is refused, wait=false is
/// acknowledged, and the API key is enforced.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_answers_like_qdrant_where_we_depend_on_it() {
    use qdrant_client::qdrant::{
        CreateCollectionBuilder, Distance, PointStruct, SearchPointsBuilder, UpdateStatus,
        UpsertPointsBuilder, VectorParamsBuilder,
    };
    let dir = tempfile::tempdir().unwrap();
    let q = tokio::task::spawn_blocking({
        let p = dir.path().to_path_buf();
        move || QdrantUnderTest::start_with(&p, 1024 * 1024, Some("test-key-1"))
    })
    .await
    .unwrap();
    let client = q.client();
    let collection = unique("c");
    client
        .create_collection(
            CreateCollectionBuilder::new(&collection)
                .vectors_config(VectorParamsBuilder::new(8, Distance::Cosine)),
        )
        .await
        .unwrap();
    let e = client
        .search_points(SearchPointsBuilder::new(&collection, vec![0.1; 5], 3))
        .await
        .unwrap_err();
    let qdrant_client::QdrantError::ResponseError { status } = e else {
        panic!("{e:?}")
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("expected dim: 8"), "{status:?}");

    let r = client
        .upsert_points(
            UpsertPointsBuilder::new(
                &collection,
                vec![PointStruct::new(
                    Uuid::new_v4(),
                    vec![0.1; 8],
                    json!({}).as_object().unwrap().clone(),
                )],
            )
            .wait(false),
        )
        .await
        .unwrap();
    let status = r.result.unwrap().status;
    assert!(
        status == UpdateStatus::Acknowledged as i32 || status == UpdateStatus::Completed as i32,
        "{status}"
    );

    if q.real {
        eprintln!(
            "real Qdrant: request size and API key checks depend on its own settings; not checked"
        );
        return;
    }
    let big = json!({"text": "가".repeat(600_000)})
        .as_object()
        .unwrap()
        .clone();
    let e = client
        .upsert_points(
            UpsertPointsBuilder::new(
                &collection,
                vec![PointStruct::new(Uuid::new_v4(), vec![0.1; 8], big)],
            )
            .wait(true),
        )
        .await
        .unwrap_err();
    let qdrant_client::QdrantError::ResponseError { status } = e else {
        panic!("{e:?}")
    };
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    for (key, code) in [
        (None, tonic::Code::Unauthenticated),
        (Some("wrong"), tonic::Code::PermissionDenied),
    ] {
        let mut b = qdrant_client::Qdrant::from_url(&q.url).skip_compatibility_check();
        if let Some(k) = key {
            b = b.api_key(k);
        }
        let e = b
            .build()
            .unwrap()
            .collection_exists(&collection)
            .await
            .unwrap_err();
        let qdrant_client::QdrantError::ResponseError { status } = e else {
            panic!("{e:?}")
        };
        assert_eq!(status.code(), code, "{status:?}");
    }
}

fn chunk_point(doc: Uuid, index: u32, dim: usize) -> Point {
    Point {
        id: streambed_decode::ids::chunk(doc, index),
        vector: unit(dim, index as usize % dim),
        sparse: None,
        payload: json!({"document_id": doc.to_string(), "chunk_index": index, "text": format!("조각 {index}")})
            .as_object()
            .unwrap()
            .clone(),
    }
}

/// The write order a document's versions rely on, through a real store: chunks, the
/// stale-chunk delete by filter (payload indexes), then the first chunk; a tombstone's
/// delete of every chunk. Another document's chunks are never touched.
async fn document_chunks_are_replaced_and_removed<S: Sink>(sink: &S) {
    let (doc, other) = (Uuid::new_v4(), Uuid::new_v4());
    let before = sink.count().await.unwrap();
    let mut first = Write::default();
    for i in 1..6 {
        first.upserts.push(chunk_point(doc, i, 8));
        first.upserts.push(chunk_point(other, i, 8));
    }
    first.stale = vec![
        ChunkRange {
            document: doc,
            from: 6,
        },
        ChunkRange {
            document: other,
            from: 6,
        },
    ];
    first.last = vec![chunk_point(doc, 0, 8), chunk_point(other, 0, 8)];
    sink.write(first).await.unwrap();
    assert_eq!(sink.count().await.unwrap(), before + 12);
    // The document again, two chunks long: chunks 2..5 of the old version go.
    sink.write(Write {
        upserts: vec![chunk_point(doc, 1, 8)],
        stale: vec![ChunkRange {
            document: doc,
            from: 2,
        }],
        last: vec![chunk_point(doc, 0, 8)],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(sink.count().await.unwrap(), before + 8);
    let ids: Vec<Uuid> = (0..6)
        .map(|i| streambed_decode::ids::chunk(doc, i))
        .collect();
    let left = sink.retrieve(ids, false).await.unwrap();
    assert_eq!(left.len(), 2, "only chunks 0 and 1 remain");
    // A tombstone removes every chunk of the document and nothing else.
    sink.write(Write {
        deletes: vec![doc],
        stale: vec![ChunkRange {
            document: doc,
            from: 0,
        }],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(sink.count().await.unwrap(), before + 6);
}

#[tokio::test]
async fn the_embedded_store_replaces_and_removes_document_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let sink = streambed::sink::embedded::EmbeddedSink::open(dir.path().join("c"), None);
    sink.ensure_collection(8).await.unwrap();
    document_chunks_are_replaced_and_removed(&sink).await;
    // The indexes survive a reopen (the shard keeps them) and creating them again is fine.
    drop(sink);
    let sink = streambed::sink::embedded::EmbeddedSink::open(dir.path().join("c"), None);
    sink.ensure_collection(8).await.unwrap();
    document_chunks_are_replaced_and_removed(&sink).await;
}
