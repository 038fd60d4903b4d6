//! End-to-end tests of `streambed run` and `streambed backfill` against a real
//! Kafka-protocol broker (tansu), the real multilingual-e5-small weights and Qdrant's own
//! engine (the embedded store).

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use streambed::ids;
use support::*;

const DIM: usize = 384;

fn json_msg(id: &str, text: &str) -> Msg {
    let v = serde_json::json!({"id": id, "text": text, "lang": "ko"});
    (
        Some(id.as_bytes().to_vec()),
        Some(v.to_string().into_bytes()),
    )
}

fn korean_messages(n: usize, prefix: &str) -> Vec<Msg> {
    korean_sentences(n)
        .iter()
        .enumerate()
        .map(|(i, s)| json_msg(&format!("{prefix}-{i}"), s))
        .collect()
}

/// The whole path: good Korean text (long, emoji, mixed scripts), poison messages and
/// tombstones over 3 partitions; metrics and readiness while running; a clean SIGTERM;
/// then the store, the dead-letter topic and the committed offsets are checked.
#[test]
fn streams_korean_text_into_the_store_with_dead_letters_and_tombstones() {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(3);

    let mut msgs = korean_messages(1000, "ko");
    let long = "대한민국의수도는서울특별시이며인구는약천만명이다".repeat(120);
    let specials = [
        ("long", long.as_str()),
        ("emoji", "오늘 날씨 정말 좋네요 😀🎉👍🏽"),
        ("mixed", "Kafka와 Qdrant로 벡터 검색 — 東京 café ∑ 123"),
        ("nul", "널\u{0}문자가 들어간 문장"),
        ("combining", "\u{0301}\u{0308} 결합 문자만"),
    ];
    for (id, text) in specials {
        msgs.push(json_msg(id, text));
    }
    let poison: Vec<Msg> = vec![
        (
            Some(b"p1".to_vec()),
            Some(b"\xff\xfe\xfd not utf-8".to_vec()),
        ),
        (
            Some(b"p2".to_vec()),
            Some(br#"{"id": "p2", "text": ""}"#.to_vec()),
        ),
        (
            Some(b"p3".to_vec()),
            Some(br#"{"id": "p3", "body": "no text"}"#.to_vec()),
        ),
        (
            Some(b"p4".to_vec()),
            Some(br#"{"id": "p4", "text": 42}"#.to_vec()),
        ),
        (Some(b"p5".to_vec()), Some(vec![b'a'; 30_000])),
        (
            Some(b"p6".to_vec()),
            Some(
                "{\"id\": \"p6\", \"text\": \" \\u0007\\t \"}"
                    .as_bytes()
                    .to_vec(),
            ),
        ),
        // Passes decoding (not whitespace or control) but has nothing to embed: rejected
        // at the tokenizer stage, whose dead letter must still carry the original bytes.
        (
            Some(b"p7".to_vec()),
            Some(
                "{\"id\": \"p7\", \"text\": \"\\u200b\\u3164\\ufeff\"}"
                    .as_bytes()
                    .to_vec(),
            ),
        ),
    ];
    msgs.extend(poison.clone());
    // Tombstones for two points written earlier (same key, so same partition, later offset).
    msgs.push((Some(b"ko-0".to_vec()), None));
    msgs.push((Some(b"ko-1".to_vec()), None));
    let ends = broker.produce(&topic, &msgs);
    let total = msgs.len();
    let good = 1000 + specials.len();

    let mut env = worker_env(&broker, &topic, &group, dir.path());
    env.push((
        "STREAMBED__MESSAGE__MAX_MESSAGE_BYTES".into(),
        "20000".into(),
    ));
    env.push(("STREAMBED__MESSAGE__METADATA_FIELDS".into(), "lang".into()));
    let mut worker = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));

    // /readyz answers 503 until the model is loaded, partitions are assigned and the
    // store is open; then 200.
    let mut saw_not_ready = false;
    wait_until("/readyz 200", Duration::from_secs(120), || {
        match worker.http("/readyz") {
            Some((503, _)) => {
                saw_not_ready = true;
                false
            }
            Some((200, _)) => true,
            _ => false,
        }
    });
    assert!(
        saw_not_ready,
        "readiness must not be 200 before the model is loaded"
    );
    assert_eq!(worker.http("/healthz").map(|r| r.0), Some(200));

    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(240));
    assert_eq!(
        worker.metric("streambed_messages_consumed_total"),
        total as f64
    );
    // The 2,880-character unspaced text is longer than the model reads: it is split into
    // chunks (one point each); every other text is one chunk.
    let embedded = worker.metric("streambed_messages_embedded_total");
    assert_eq!(worker.metric("streambed_points_upserted_total"), embedded);
    assert_eq!(
        worker.metric("streambed_documents_written_total"),
        good as f64
    );
    assert_eq!(worker.metric("streambed_points_deleted_total"), 2.0);
    assert_eq!(
        worker.metric("streambed_messages_dead_lettered_total"),
        poison.len() as f64
    );
    assert!(worker.metric("streambed_batches_total") >= 1.0);
    assert_eq!(worker.metric("streambed_in_flight_messages"), 0.0);
    assert_eq!(worker.metric("streambed_model_info"), 1.0);

    worker.stop();
    assert!(worker.log_text().contains("stopped"));

    let points = read_store(dir.path(), DIM);
    let long_id = ids::from_entity(b"long").to_string();
    let mut long_chunks: Vec<&streambed::sink::Hit> = points
        .values()
        .filter(|p| p.payload["document_id"] == long_id.as_str())
        .collect();
    long_chunks.sort_by_key(|p| p.payload["chunk_index"].as_u64());
    assert!(long_chunks.len() >= 2, "the long text is split");
    assert_eq!(embedded as usize, good - 1 + long_chunks.len());
    assert_eq!(
        points.len(),
        good - 2 - 1 + long_chunks.len(),
        "one point per distinct id (the long one per chunk), tombstoned ones gone"
    );
    let chars: Vec<char> = long.chars().collect();
    let mut covered = 0;
    for c in &long_chunks {
        let (a, b) = (
            c.payload["chunk_start"].as_u64().unwrap() as usize,
            c.payload["chunk_end"].as_u64().unwrap() as usize,
        );
        assert!(a <= covered && b > covered);
        assert_eq!(c.payload["text"], chars[a..b].iter().collect::<String>());
        covered = b;
    }
    assert_eq!(covered, chars.len());
    for (i, s) in korean_sentences(1000).iter().enumerate() {
        let id = ids::from_entity(format!("ko-{i}").as_bytes()).to_string();
        if i < 2 {
            assert!(!points.contains_key(&id), "ko-{i} was tombstoned");
            continue;
        }
        let p = points.get(&id).unwrap_or_else(|| panic!("ko-{i} missing"));
        assert_eq!(p.payload["text"], s.as_str());
        assert_eq!(p.payload["lang"], "ko");
        assert_eq!(p.payload["topic"], topic.as_str());
    }
    for (id, text) in specials {
        let p = &points[&ids::from_entity(id.as_bytes()).to_string()];
        if id != "long" {
            assert_eq!(p.payload["text"], text);
        }
    }

    // The stored vector is the model's embedding of the text (Qdrant normalises for cosine).
    let model = streambed::embed::load_model(
        e5_model().to_str().unwrap(),
        "passage: ",
        &Default::default(),
    )
    .unwrap();
    use streambed::embed::Encoder;
    for id in ["ko-5", "emoji", "long"] {
        let p = &points[&ids::from_entity(id.as_bytes()).to_string()];
        let text = p.payload["text"].as_str().unwrap();
        let t = model.tokenizer.tokenize(text).unwrap();
        let fresh = model.encoder.embed(&[t.ids.as_slice()]).unwrap().remove(0);
        let cos = streambed::embed::cosine(&fresh, p.vector.as_ref().unwrap());
        assert!(cos > 0.9999, "{id}: cosine {cos}");
    }

    let dead = broker.read(
        &format!("{topic}-dlq"),
        poison.len(),
        Duration::from_secs(30),
    );
    let reasons: HashSet<&str> = dead
        .iter()
        .map(|r| r.headers["streambed.reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        HashSet::from([
            "invalid_utf8",
            "empty_text",
            "missing_text_field",
            "text_not_string",
            "too_large"
        ])
    );
    assert_eq!(dead.len(), poison.len());
    for r in &dead {
        assert_eq!(r.headers["streambed.original_topic"], topic);
        assert_eq!(r.headers["streambed.error_class"], "permanent");
        assert!(!r.headers["streambed.error"].is_empty());
        let key = r.key.clone().unwrap();
        let original = poison.iter().find(|p| p.0.as_ref() == Some(&key)).unwrap();
        assert_eq!(
            r.value, original.1,
            "the dead letter carries the original bytes"
        );
    }
}

/// SIGKILL mid-stream, restart: every message ends up as exactly one point.
#[test]
fn sigkill_mid_stream_then_restart_loses_and_duplicates_nothing() {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(3);
    let n = 1500;
    let ends = broker.produce(&topic, &korean_messages(n, "k"));
    let env = worker_env(&broker, &topic, &group, dir.path());

    let mut first = Worker::spawn(&["run"], &env, &dir.path().join("first.log"));
    wait_until("some progress", Duration::from_secs(120), || {
        first
            .metric_opt("streambed_points_upserted_total")
            .is_some_and(|v| v >= 300.0)
    });
    first.kill9();
    let committed_at_kill: i64 = broker.committed(&group, &topic, 3).values().sum();
    assert!((committed_at_kill as usize) < n, "killed before the end");

    let mut second = Worker::spawn(&["run"], &env, &dir.path().join("second.log"));
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(240));
    second.stop();

    let points = read_store(dir.path(), DIM);
    assert_eq!(points.len(), n, "no loss, no duplicates");
    let expected: HashSet<String> = (0..n)
        .map(|i| ids::from_entity(format!("k-{i}").as_bytes()).to_string())
        .collect();
    assert_eq!(points.keys().cloned().collect::<HashSet<_>>(), expected);
}

/// A second consumer joins the group mid-stream and leaves again: nothing is lost and
/// nothing duplicated. Both workers write to one shared store, the Qdrant-protocol test
/// server (or a real Qdrant with `QDRANT_URL`), through the real Qdrant client.
#[test]
fn a_consumer_joining_and_leaving_loses_nothing() {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(3);
    let collection = unique("c");
    let q = QdrantUnderTest::start(dir.path());
    let n = 2000;
    let all = korean_messages(n, "j");
    let mut ends = broker.produce(&topic, &all[..1000]);
    let env = |name: &str| {
        let mut e = worker_env(&broker, &topic, &group, &dir.path().join(name));
        e.extend(q.worker_env(&collection));
        e
    };

    let mut a = Worker::spawn(&["run"], &env("a"), &dir.path().join("a.log"));
    wait_until("a makes progress", Duration::from_secs(120), || {
        a.metric_opt("streambed_points_upserted_total")
            .is_some_and(|v| v >= 200.0)
    });
    let mut b = Worker::spawn(&["run"], &env("b"), &dir.path().join("b.log"));
    wait_until("b is assigned partitions", Duration::from_secs(120), || {
        b.http("/readyz").is_some_and(|r| r.0 == 200)
    });
    // The second half arrives while both members share the partitions.
    for (p, end) in broker.produce(&topic, &all[1000..]) {
        let e = ends.entry(p).or_insert(0);
        *e = (*e).max(end);
    }
    wait_until("b works", Duration::from_secs(120), || {
        b.metric("streambed_points_upserted_total") >= 100.0
    });
    b.stop();
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(240));
    a.stop();

    let expected: HashSet<String> = (0..n)
        .map(|i| ids::from_entity(format!("j-{i}").as_bytes()).to_string())
        .collect();
    let points = q.read_collection(&collection, DIM);
    assert_eq!(
        points.keys().cloned().collect::<HashSet<_>>(),
        expected,
        "every message exactly once"
    );
}

/// A backfill interrupted with SIGKILL resumes from its checkpoint and completes with
/// exactly one point per line.
#[test]
fn backfill_interrupted_and_resumed_is_complete_without_duplicates() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus.jsonl");
    let n = 2000;
    let mut lines = String::new();
    for (i, s) in korean_sentences(n).iter().enumerate() {
        if i % 2 == 0 {
            lines.push_str(&serde_json::json!({"id": format!("b-{i}"), "text": s}).to_string());
        } else {
            lines.push_str(&serde_json::json!({"text": s}).to_string());
        }
        lines.push('\n');
    }
    lines.push_str("{\"text\": \"\"}\n");
    std::fs::write(&input, &lines).unwrap();
    let mut env = vec![
        (
            "STREAMBED__MODEL__PATH".to_string(),
            e5_model().to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__EMBEDDED__PATH".to_string(),
            dir.path().join("store").to_string_lossy().into_owned(),
        ),
    ];
    env.push(("STREAMBED__METRICS__ADDR".into(), String::new()));
    let args = ["backfill", "--input", input.to_str().unwrap()];
    let checkpoint = dir.path().join("streambed-backfill.checkpoint.json");

    let mut first = Worker::spawn(&args, &env, &dir.path().join("first.log"));
    wait_until(
        "a checkpoint with progress",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&checkpoint)
                .ok()
                .and_then(|s| serde_json::from_str::<HashMap<String, u64>>(&s).ok())
                .is_some_and(|m| m.values().any(|v| *v >= 300))
        },
    );
    first.kill9();

    let mut second = Worker::spawn(&args, &env, &dir.path().join("second.log"));
    assert_eq!(
        second.wait(Duration::from_secs(300)),
        Some(0),
        "{}",
        second.log_text()
    );
    assert!(
        second.log_text().contains("complete=true"),
        "{}",
        second.log_text()
    );

    let points = read_store(&dir.path().join("store"), DIM);
    assert_eq!(
        points.len(),
        n,
        "one point per line, the empty line dead-lettered"
    );
    let dead =
        std::fs::read_to_string(dir.path().join("streambed-backfill.dead-letter.jsonl")).unwrap();
    assert!(dead.contains("empty_text"), "{dead}");
    assert!(points.contains_key(&ids::from_entity(b"b-0").to_string()));
    assert!(points.contains_key(&ids::from_file_line(input.to_str().unwrap(), 1).to_string()));
}

/// A directory of CSV, gzip'd text and JSON lines goes through the same path; ids come
/// from the id column or from file + line, payloads say where each point came from.
#[test]
fn backfill_reads_csv_gzip_text_and_jsonl_from_a_directory() {
    use std::io::Write;
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("corpus");
    std::fs::create_dir_all(input.join("nested")).unwrap();
    std::fs::write(
        input.join("a.csv"),
        "id,text,lang\nc1,\"쉼표, 그리고 따옴표\"\"가 있는 문장\",ko\nc2,두 번째 문장,ko\n",
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(input.join("nested/b.txt.gz")).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all("첫 줄입니다\n둘째 줄 😀\n셋째 줄 mixed 東京\n".as_bytes())
        .unwrap();
    gz.finish().unwrap();
    std::fs::write(
        input.join("c.jsonl"),
        "{\"id\": \"j1\", \"text\": \"제이슨 문장\"}\n",
    )
    .unwrap();
    std::fs::write(
        input.join("d.tsv"),
        "id\ttext\tlang\nt1\t탭으로 나눈 문장, 쉼표도\tko\nt2\t둘째 탭 문장\tko\n",
    )
    .unwrap();
    std::fs::write(input.join("ignored.parquet"), "not read").unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let env = vec![
        ("STREAMBED__METRICS__ADDR".to_string(), metrics_addr.clone()),
        (
            "STREAMBED__MODEL__PATH".to_string(),
            e5_model().to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__EMBEDDED__PATH".to_string(),
            dir.path().join("store").to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__MESSAGE__METADATA_FIELDS".to_string(),
            "lang".to_string(),
        ),
    ];
    let mut w = Worker::spawn(
        &["backfill", "--input", input.to_str().unwrap()],
        &env,
        &dir.path().join("b.log"),
    );
    assert_eq!(
        w.wait(Duration::from_secs(120)),
        Some(0),
        "{}",
        w.log_text()
    );
    assert!(w.log_text().contains("files=4 lines=8"), "{}", w.log_text());
    assert!(
        w.log_text().contains("serving /metrics") && w.log_text().contains(&metrics_addr),
        "a backfill serves /metrics like run: {}",
        w.log_text()
    );
    let points = read_store(&dir.path().join("store"), DIM);
    assert_eq!(points.len(), 8);
    let t1 = &points[&ids::from_entity(b"t1").to_string()];
    assert_eq!(t1.payload["text"], "탭으로 나눈 문장, 쉼표도");
    assert_eq!(t1.payload["lang"], "ko");
    let c1 = &points[&ids::from_entity(b"c1").to_string()];
    assert_eq!(c1.payload["text"], "쉼표, 그리고 따옴표\"가 있는 문장");
    assert_eq!(c1.payload["lang"], "ko");
    let gz_file = input.join("nested/b.txt.gz");
    let line1 = &points[&ids::from_file_line(gz_file.to_str().unwrap(), 1).to_string()];
    assert_eq!(line1.payload["text"], "둘째 줄 😀");
    assert_eq!(line1.payload["line"], 1);
    assert!(points.contains_key(&ids::from_entity(b"j1").to_string()));
}

/// Debezium change events for one table, through the real broker and the store: snapshot
/// reads, a create, an update, a delete with its tombstone, a truncate; with and without
/// the schema wrapper; the primary key in the record key. The text comes from a template
/// over two columns. The store ends equal to the table's final state, and the rows that
/// cannot be embedded are dead-lettered with their reason.
#[test]
fn debezium_change_events_leave_the_store_equal_to_the_table() {
    let _g = heavy();
    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(1);
    let source = serde_json::json!({"db": "shop", "schema": "public", "table": "articles"});
    let event = |op: &str, before: serde_json::Value, after: serde_json::Value, wrapped: bool| {
        let payload = serde_json::json!({
            "before": before, "after": after, "op": op, "source": source, "ts_ms": 1
        });
        let v = if wrapped {
            serde_json::json!({"schema": {"type": "struct", "name": "envelope"}, "payload": payload})
        } else {
            payload
        };
        Some(v.to_string().into_bytes())
    };
    let key = |id: i64, wrapped: bool| {
        let k = if wrapped {
            serde_json::json!({"schema": {"type": "struct"}, "payload": {"id": id}})
        } else {
            serde_json::json!({"id": id})
        };
        Some(k.to_string().into_bytes())
    };
    let row = |id: i64, title: &str, body: serde_json::Value| serde_json::json!({"id": id, "title": title, "body": body, "lang": "ko"});
    let null = serde_json::Value::Null;
    let msgs: Vec<Msg> = vec![
        (
            key(1, true),
            event("r", null.clone(), row(1, "서울", "수도입니다".into()), true),
        ),
        (
            key(2, false),
            event("r", null.clone(), row(2, "부산", "항구 도시".into()), false),
        ),
        (
            key(3, true),
            event("r", null.clone(), row(3, "대구", "분지".into()), true),
        ),
        (
            key(4, false),
            event("c", null.clone(), row(4, "인천", "공항".into()), false),
        ),
        (
            key(2, false),
            event(
                "u",
                row(2, "부산", "항구 도시".into()),
                row(2, "부산광역시", "바다".into()),
                false,
            ),
        ),
        (
            key(3, true),
            event("d", row(3, "대구", "분지".into()), null.clone(), true),
        ),
        (key(3, true), None),
        // A missing body: the template renders the title alone.
        (
            key(5, false),
            event(
                "c",
                null.clone(),
                serde_json::json!({"id": 5, "title": "광주"}),
                false,
            ),
        ),
        // A body that is an object: not text.
        (
            key(6, false),
            event(
                "c",
                null.clone(),
                row(6, "대전", serde_json::json!({"x": 1})),
                false,
            ),
        ),
        // Nothing to embed.
        (
            key(7, false),
            event("c", null.clone(), row(7, "", null.clone()), false),
        ),
        (None, event("t", null.clone(), null.clone(), false)),
    ];
    let ends = broker.produce(&topic, &msgs);
    let mut env = worker_env(&broker, &topic, &group, dir.path());
    env.push(("STREAMBED__MESSAGE__FORMAT".into(), "debezium".into()));
    env.push((
        "STREAMBED__MESSAGE__TEXT_TEMPLATE".into(),
        "{title}\n\n{body}".into(),
    ));
    env.push(("STREAMBED__MESSAGE__METADATA_FIELDS".into(), "lang".into()));
    let mut w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(120));
    w.stop();
    let points = read_store(dir.path(), DIM);
    let text_of = |id: &str| {
        points
            .get(&ids::from_entity(id.as_bytes()).to_string())
            .map(|p| p.payload["text"].as_str().unwrap().to_string())
    };
    assert_eq!(
        points.len(),
        4,
        "{:?}",
        points.values().map(|p| &p.payload).collect::<Vec<_>>()
    );
    assert_eq!(text_of("1").as_deref(), Some("서울\n\n수도입니다"));
    assert_eq!(
        text_of("2").as_deref(),
        Some("부산광역시\n\n바다"),
        "the update won"
    );
    assert_eq!(text_of("3"), None, "deleted");
    assert_eq!(text_of("4").as_deref(), Some("인천\n\n공항"));
    assert_eq!(text_of("5").as_deref(), Some("광주\n\n"));
    let p2 = &points[&ids::from_entity(b"2").to_string()];
    assert_eq!(p2.payload["lang"], "ko");
    assert_eq!(p2.payload["source_table"], "articles");
    let dead = broker.read(&format!("{topic}-dlq"), 3, Duration::from_secs(30));
    let reasons: HashSet<&str> = dead
        .iter()
        .map(|r| r.headers["streambed.reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        HashSet::from(["text_not_string", "empty_text", "debezium_truncate"])
    );
}
