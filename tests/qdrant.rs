//! The Qdrant sink over real gRPC with the real `qdrant-client`: against streambed's
//! Qdrant-protocol test server (qdrant-edge behind qdrant-client's own server traits), or
//! a real Qdrant when `QDRANT_URL` is set.

mod support;

use std::time::Duration;

use serde_json::json;
use streambed::settings::{QdrantSettings, Secret};
use streambed::sink::qdrant::QdrantSink;
use streambed::sink::{Point, Sink, SinkError};
use support::*;
use uuid::Uuid;

fn settings(url: &str, collection: &str) -> QdrantSettings {
    QdrantSettings {
        url: url.to_string(),
        collection: collection.to_string(),
        api_key: Secret::default(),
        timeout_ms: 5000,
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
    let sink = QdrantSink::connect(&settings(&q.url, &collection)).unwrap();
    sink.ping().await.unwrap();
    sink.ensure_collection(8).await.unwrap();
    sink.ensure_collection(8).await.unwrap(); // idempotent

    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let points = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Point {
            id: *id,
            vector: unit(8, i),
            payload: json!({"text": format!("문장 {i} 😀"), "n": i})
                .as_object()
                .unwrap()
                .clone(),
        })
        .collect();
    sink.write(points, vec![]).await.unwrap();
    assert_eq!(sink.count().await.unwrap(), 3);

    let hits = sink.search(unit(8, 1), 2).await.unwrap();
    assert_eq!(hits[0].id, ids[1].to_string());
    assert!((hits[0].score - 1.0).abs() < 1e-5);
    assert_eq!(hits[0].payload["text"], "문장 1 😀");

    let got = sink.retrieve(vec![ids[2]]).await.unwrap();
    assert_eq!(got[0].payload["n"], 2);
    assert_eq!(got[0].vector.as_deref(), Some(unit(8, 2).as_slice()));

    // A replay of the same id overwrites; a delete removes.
    let again = Point {
        id: ids[0],
        vector: unit(8, 7),
        payload: json!({"text": "덮어쓰기"}).as_object().unwrap().clone(),
    };
    sink.write(vec![again], vec![ids[1]]).await.unwrap();
    assert_eq!(sink.count().await.unwrap(), 2);
    assert_eq!(
        sink.retrieve(vec![ids[0]]).await.unwrap()[0].payload["text"],
        "덮어쓰기"
    );

    // The same collection for a model of another dimension is refused with the fix.
    match QdrantSink::connect(&settings(&q.url, &collection))
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
/// stored meanwhile, /readyz says not ready, and the worker recovers on its own.
#[test]
fn worker_survives_a_qdrant_outage() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let mut q = QdrantUnderTest::start(dir.path());
    if q.real {
        eprintln!("QDRANT_URL is set: the outage test needs the restartable test server; skipped");
        return;
    }
    let broker = Broker::start();
    let topic = unique("events");
    let group = unique("group");
    let collection = unique("c");
    broker.create_topic(&topic, 3);
    let sentences = korean_sentences(4000);
    let msgs: Vec<Msg> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let id = format!("q-{i}");
            (
                Some(id.clone().into_bytes()),
                Some(json!({"id": id, "text": s}).to_string().into_bytes()),
            )
        })
        .collect();
    let mut ends = broker.produce(&topic, &msgs[..800]);

    let mut env = worker_env(&broker, &topic, &group, &dir.path().join("unused"));
    env.push(("STREAMBED__SINK__KIND".into(), "qdrant".into()));
    env.push(("STREAMBED__QDRANT__URL".into(), q.url.clone()));
    env.push(("STREAMBED__QDRANT__COLLECTION".into(), collection.clone()));
    env.push(("STREAMBED__SINK__RETRY_MAX_MS".into(), "1000".into()));
    let mut worker = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    wait_until(
        "progress before the outage",
        Duration::from_secs(120),
        || worker.metric("streambed_points_upserted_total") >= 200.0,
    );

    q.down();
    let outage_started = std::time::Instant::now();
    let stored_at_outage = q.read_collection(&collection, 384).len();
    for (p, end) in broker.produce(&topic, &msgs[800..]) {
        ends.insert(p, end);
    }
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
    eprintln!(
        "outage: {:.0} s, rss at first retry {rss_start:.0} MB, max {rss_max:.0} MB, stored before {stored_at_outage}, \
         retries {}",
        outage_started.elapsed().as_secs_f64(),
        worker.metric("streambed_sink_retries_total")
    );
    assert!(
        rss_max - rss_start < 100.0,
        "memory stays bounded during the outage: {rss_start:.0} MB -> {rss_max:.0} MB"
    );

    q.up();
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(240));
    assert_eq!(worker.http("/readyz").map(|r| r.0), Some(200));
    worker.stop();
    q.down();
    let points = q.read_collection(&collection, 384);
    assert_eq!(
        points.len(),
        msgs.len(),
        "every message stored once after recovery"
    );
}
