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
    for k in 0..kills {
        let log = dir.path().join(format!("worker-{k}.log"));
        let mut w = Worker::spawn(&["run"], &env, &log);
        // Anywhere from model loading through group join to full speed.
        let life = Duration::from_millis(rng.random_range(2_000..14_000));
        std::thread::sleep(life);
        w.kill9();
        let c = committed(&broker);
        eprintln!(
            "chaos: kill {}/{kills} after {:.1} s, committed {c}",
            k + 1,
            life.as_secs_f64()
        );
        progress.push(c);
    }
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
    let dead_lettered_metric = last.metric("streambed_dead_lettered_total");
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
    let dlq = broker.read(
        &format!("{topic}-dlq"),
        plan.poison_keys.len(),
        Duration::from_secs(60),
    );
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
