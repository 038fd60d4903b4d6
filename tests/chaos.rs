//! The chaos program of docs/RELIABILITY.md: Korean messages stream into 3 partitions
//! while the worker is killed with SIGKILL at random moments and restarted; at the end the
//! store must hold exactly one point per distinct message id, with the text of the id's
//! last message and a vector equal to a fresh embedding of that text, and every poison
//! message must be in the dead-letter topic.
//!
//! Scale and randomness come from the environment (defaults in brackets):
//! `CHAOS_MESSAGES` [50000], `CHAOS_KILLS` [10], `CHAOS_SEED` [time], `CHAOS_MODEL`
//! [multilingual-e5-small: a model folder name under models/]. The seed is printed, so a failing
//! run can be repeated. Loopback only; bounded by the timeouts below.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use streambed::ids;
use support::*;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the run sends, and what the store must hold afterwards.
struct Plan {
    messages: Vec<Msg>,
    /// id (as in the message) → text of its last message.
    last_text: HashMap<String, String>,
    /// Offsets are not known before producing; poison messages are recognised in the
    /// dead-letter topic by their key.
    poison_keys: HashSet<Vec<u8>>,
}

/// Every 100th message is poison (bad JSON, empty text, invalid UTF-8, in turn). The last
/// tenth of the good messages reuse earlier ids with other text: the later one must win.
fn plan(n: usize) -> Plan {
    let sentences = korean_sentences(5000);
    let distinct = (n * 9 / 10).max(1);
    let mut messages = Vec::with_capacity(n);
    let mut last_text = HashMap::new();
    let mut poison_keys = HashSet::new();
    for i in 0..n {
        if i % 100 == 99 {
            let key = format!("p-{i}").into_bytes();
            let value: Vec<u8> = match (i / 100) % 3 {
                0 => b"{\"id\": \"broken".to_vec(),
                1 => serde_json::json!({"id": format!("p-{i}"), "text": " \u{0007} "})
                    .to_string()
                    .into_bytes(),
                _ => vec![0xff, 0xfe, b'x', 0x80],
            };
            poison_keys.insert(key.clone());
            messages.push((Some(key), Some(value)));
            continue;
        }
        let id = format!("c-{}", i % distinct);
        let text = sentences[(i * 7919) % sentences.len()].clone();
        let v = serde_json::json!({"id": id, "text": text, "seq": i});
        messages.push((
            Some(id.clone().into_bytes()),
            Some(v.to_string().into_bytes()),
        ));
        last_text.insert(id, text);
    }
    Plan {
        messages,
        last_text,
        poison_keys,
    }
}

#[test]
fn sigkill_ten_times_while_streaming_loses_and_duplicates_nothing() {
    let _g = heavy();
    let n: usize = env_or("CHAOS_MESSAGES", 50_000);
    let kills: usize = env_or("CHAOS_KILLS", 10);
    let seed: u64 = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let model_name: String = env_or("CHAOS_MODEL", "multilingual-e5-small".to_string());
    let model = models_dir().join(&model_name);
    eprintln!("chaos: messages={n} kills={kills} seed={seed} model={model_name}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let Scenario {
        broker,
        topic,
        group,
        dir,
    } = Scenario::new(3);
    let plan = plan(n);
    let started = Instant::now();

    // The stream: produced from another thread while the worker runs and dies.
    let producer = {
        let (addr, topic, messages) = (broker.addr.clone(), topic.clone(), plan.messages.clone());
        std::thread::spawn(move || produce_to(&addr, &topic, &messages))
    };

    let mut env = worker_env(&broker, &topic, &group, dir.path());
    env.retain(|(k, _)| k != "STREAMBED__MODEL__PATH");
    env.push((
        "STREAMBED__MODEL__PATH".into(),
        model.to_string_lossy().into_owned(),
    ));
    let committed = |b: &Broker| -> i64 { b.committed(&group, &topic, 3).values().sum() };

    let mut progress = Vec::new();
    let mut exits = Vec::new();
    for k in 0..kills {
        let log = dir.path().join(format!("worker-{k}.log"));
        let mut w = Worker::spawn(&["run"], &env, &log);
        // From model loading through the group join (a killed member holds its partitions
        // until its session times out, 6 s) to full speed.
        let life = Duration::from_millis(rng.random_range(4_000..26_000));
        std::thread::sleep(life);
        // The restart happened and the worker was still running when killed (it did not
        // exit by itself, cleanly or not); it dies of the signal, with no exit code.
        assert!(
            w.running(),
            "worker {k} exited before its kill; log:\n{}",
            w.log_text()
        );
        let code = w.kill9();
        assert_eq!(code, None, "worker {k} died of SIGKILL");
        exits.push(code);
        let c = committed(&broker);
        eprintln!(
            "chaos: kill {}/{kills} after {:.1} s, committed {c}",
            k + 1,
            life.as_secs_f64()
        );
        progress.push(c);
    }
    assert_eq!(
        exits.len(),
        kills,
        "every planned restart and kill happened"
    );
    let ends = producer.join().expect("producer thread");
    let produced: i64 = ends.values().sum();
    assert_eq!(produced as usize, n, "every message produced");
    assert!(
        progress.last().copied().unwrap_or(0) > 0,
        "the killed workers made progress between kills: {progress:?}"
    );
    if progress.last().copied().unwrap_or(0) as usize >= n {
        eprintln!("chaos: note: the stream was fully committed before the last kill");
    }

    let mut last = Worker::spawn(&["run"], &env, &dir.path().join("worker-final.log"));
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(1800));
    let dead_lettered_metric = last.metric("streambed_messages_dead_lettered_total");
    // stop() asserts exit code 0 after SIGTERM.
    last.stop();
    let elapsed = started.elapsed();

    // The store: one point per id, the last text, a vector equal to a fresh embedding.
    let dim = streambed::embed::ModelSpec::read(&model)
        .unwrap()
        .bert
        .hidden_size;
    let points = read_store(dir.path(), dim);
    let expected: HashMap<String, &String> = plan
        .last_text
        .iter()
        .map(|(id, t)| (ids::from_entity(id.as_bytes()).to_string(), t))
        .collect();
    let missing = expected.keys().filter(|k| !points.contains_key(*k)).count();
    let extra = points.keys().filter(|k| !expected.contains_key(*k)).count();
    let wrong_text: Vec<&String> = expected
        .iter()
        .filter(|(k, t)| {
            points
                .get(*k)
                .is_some_and(|p| p.payload.get("text").and_then(|v| v.as_str()) != Some(t.as_str()))
        })
        .map(|(k, _)| k)
        .collect();

    let m = streambed::embed::load_model(
        model.to_str().unwrap(),
        "passage: ",
        &streambed::embed::EncoderOptions {
            device: streambed::embed::DeviceKind::Cpu,
            precision: streambed::embed::Precision::F32,
            max_batch: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let texts: Vec<&String> = {
        let set: HashSet<&String> = expected.values().copied().collect();
        set.into_iter().collect()
    };
    let mut fresh: HashMap<&String, Vec<f32>> = HashMap::new();
    for chunk in texts.chunks(256) {
        let toks: Vec<Vec<u32>> = chunk
            .iter()
            .map(|t| m.tokenizer.tokenize(t).unwrap().ids)
            .collect();
        let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
        use streambed::embed::Encoder;
        for (t, v) in chunk.iter().zip(m.encoder.embed(&refs).unwrap()) {
            fresh.insert(t, v);
        }
    }
    let mut worst = 1.0f32;
    for (k, t) in &expected {
        if let Some(v) = points.get(k).and_then(|p| p.vector.as_ref()) {
            worst = worst.min(streambed::embed::cosine(v, &fresh[t]));
        }
    }

    // Dead letters: every poison message, found by key (a crash between the dead letter
    // and the commit may deliver one twice; distinct keys must match exactly).
    let dlq = broker.read_until(&format!("{topic}-dlq"), Duration::from_secs(60), |got| {
        got.iter()
            .filter_map(|r| r.key.as_ref())
            .collect::<HashSet<_>>()
            .len()
            >= plan.poison_keys.len()
    });
    let dlq_keys: HashSet<Vec<u8>> = dlq.iter().filter_map(|r| r.key.clone()).collect();

    eprintln!(
        "chaos result: seed={seed} messages_sent={n} distinct_ids={} points_stored={} missing={missing} \
         duplicates_or_unexpected={extra} wrong_text={} min_cosine_vs_fresh={worst:.6} \
         dead_lettered_distinct={} dead_letter_records={} (final worker metric {dead_lettered_metric}) \
         restarts_survived={kills} elapsed_s={:.0}",
        expected.len(),
        points.len(),
        wrong_text.len(),
        dlq_keys.len(),
        dlq.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(missing, 0, "no id lost");
    assert_eq!(extra, 0, "no unexpected point");
    assert_eq!(points.len(), expected.len(), "one point per id");
    assert!(
        wrong_text.is_empty(),
        "last message wins: {:?}",
        &wrong_text[..wrong_text.len().min(5)]
    );
    assert!(
        worst > 0.9999,
        "stored vectors equal fresh embeddings (worst cosine {worst})"
    );
    assert_eq!(
        dlq_keys, plan.poison_keys,
        "every poison message dead-lettered"
    );
}

/// Korean JSON messages with ids `{prefix}-{i}`.
fn korean_json(n: usize, prefix: &str) -> Vec<Msg> {
    let sentences = korean_sentences(5000);
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let v = serde_json::json!({"id": id, "text": sentences[i % sentences.len()]});
            (Some(id.into_bytes()), Some(v.to_string().into_bytes()))
        })
        .collect()
}

fn expected_ids(n: usize, prefix: &str) -> HashSet<String> {
    (0..n)
        .map(|i| ids::from_entity(format!("{prefix}-{i}").as_bytes()).to_string())
        .collect()
}

/// The broker goes away (every connection refused) for 15 s mid-stream and comes back with
/// its data: the worker keeps its state, resumes, and the store ends up with every message
/// once. Staged with librdkafka's mock cluster, which can take brokers down and up
/// keeping their logs and the group's offsets (tansu's persistent storage needs S3 or
/// PostgreSQL).
#[test]
fn broker_down_and_back_loses_and_duplicates_nothing() {
    use rdkafka::mocking::MockCluster;
    let _g = heavy();
    let cluster = MockCluster::new(1).unwrap();
    let addr = cluster.bootstrap_servers();
    let topic = unique("events");
    let group = unique("group");
    cluster.create_topic(&topic, 3, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let n = 1600;
    let msgs = korean_json(n, "b");
    let mut ends = produce_to(&addr, &topic, &msgs[..800]);

    let env = worker_env_at(&addr, &topic, &group, dir.path());
    let mut w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    wait_until(
        "progress before the outage",
        Duration::from_secs(120),
        || {
            w.metric_opt("streambed_points_upserted_total")
                .is_some_and(|v| v >= 200.0)
        },
    );
    cluster.broker_down(-1).unwrap();
    let down_at = w.metric("streambed_points_upserted_total");
    std::thread::sleep(Duration::from_secs(15));
    cluster.broker_up(-1).unwrap();
    eprintln!("broker outage: 15 s, upserted when it began {down_at}");
    for (p, end) in produce_to(&addr, &topic, &msgs[800..]) {
        let e = ends.entry(p).or_insert(0);
        *e = (*e).max(end);
    }
    wait_until(
        "offsets committed to the end",
        Duration::from_secs(240),
        || {
            let c = committed_at(&addr, &group, &topic, 3);
            ends.iter().all(|(p, end)| c.get(p) == Some(end))
        },
    );
    w.stop();
    let points = read_store(dir.path(), 384);
    assert_eq!(
        points.keys().cloned().collect::<HashSet<_>>(),
        expected_ids(n, "b"),
        "every message exactly once"
    );
}

/// Workers join and leave the group every few seconds (SIGTERM, and now and then SIGKILL)
/// while messages stream in; all write to one Qdrant-protocol store. Nothing is lost and
/// nothing duplicated. Against librdkafka's mock cluster: tansu's group coordinator
/// wedged under this churn (members joined and never got an assignment; see
/// docs/RELIABILITY.md), and `CHURN_BROKER=tansu` runs it there.
#[test]
fn workers_joining_and_leaving_every_few_seconds_lose_nothing() {
    use rdkafka::mocking::MockCluster;
    let _g = heavy();
    let seed: u64 = env_or("CHAOS_SEED", 7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let topic = unique("events");
    let group = unique("group");
    let dir = tempfile::tempdir().unwrap();
    let on_tansu = std::env::var("CHURN_BROKER").is_ok_and(|b| b == "tansu");
    let (mock, tansu);
    let addr = if on_tansu {
        tansu = Broker::start();
        tansu.create_topic(&topic, 3);
        tansu.addr.clone()
    } else {
        mock = MockCluster::new(1).unwrap();
        mock.create_topic(&topic, 3, 1).unwrap();
        mock.bootstrap_servers()
    };
    let q = QdrantUnderTest::start(dir.path());
    let collection = unique("c");
    let n: usize = env_or("CHURN_MESSAGES", 4000);
    let msgs = korean_json(n, "u");
    let producer = {
        let (addr, topic) = (addr.clone(), topic.clone());
        let msgs = msgs.clone();
        std::thread::spawn(move || {
            // In four waves, so that messages arrive during the churn.
            let mut ends: HashMap<i32, i64> = HashMap::new();
            for part in msgs.chunks(msgs.len().div_ceil(4)) {
                for (p, end) in produce_to(&addr, &topic, part) {
                    let e = ends.entry(p).or_insert(0);
                    *e = (*e).max(end);
                }
                std::thread::sleep(Duration::from_secs(5));
            }
            ends
        })
    };
    let env = |name: &str| {
        let mut e = worker_env_at(&addr, &topic, &group, &dir.path().join(name));
        e.extend(q.worker_env(&collection));
        e
    };
    let mut running: Vec<Worker> = Vec::new();
    let (mut joins, mut leaves, mut kills) = (0, 0, 0);
    let churn_until = Instant::now() + Duration::from_secs(env_or("CHURN_SECONDS", 60));
    let mut k = 0;
    while Instant::now() < churn_until {
        let join = running.is_empty() || (running.len() < 3 && rng.random_bool(0.6));
        if join {
            k += 1;
            let name = format!("w{k}");
            running.push(Worker::spawn(
                &["run"],
                &env(&name),
                &dir.path().join(format!("{name}.log")),
            ));
            joins += 1;
        } else {
            let i = rng.random_range(0..running.len());
            let mut w = running.swap_remove(i);
            // Every third departure is a crash.
            if (leaves + kills) % 3 == 2 {
                assert!(
                    w.running(),
                    "worker exited before its kill; log:\n{}",
                    w.log_text()
                );
                assert_eq!(w.kill9(), None, "died of SIGKILL");
                kills += 1;
            } else {
                w.stop();
                leaves += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(3_000..7_000)));
    }
    let ends = producer.join().unwrap();
    if running.is_empty() {
        running.push(Worker::spawn(
            &["run"],
            &env("last"),
            &dir.path().join("last.log"),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let c = committed_at(&addr, &group, &topic, 3);
        if ends.iter().all(|(p, end)| c.get(p) == Some(end)) {
            break;
        }
        if Instant::now() > deadline {
            let kept = dir.keep();
            panic!(
                "not committed to the end: committed {c:?}, ends {ends:?}; logs kept in {}",
                kept.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for mut w in running {
        w.stop();
    }
    eprintln!(
        "churn: broker={} seed={seed} messages={n} joins={joins} graceful_leaves={leaves} sigkills={kills}",
        if on_tansu { "tansu" } else { "librdkafka-mock" }
    );
    assert!(
        joins >= 3 && leaves >= 1 && kills >= 1,
        "the churn happened: {joins} joins, {leaves} leaves, {kills} kills"
    );
    let points = q.read_collection(&collection, 384);
    assert_eq!(
        points.keys().cloned().collect::<HashSet<_>>(),
        expected_ids(n, "u"),
        "every message exactly once"
    );
}
