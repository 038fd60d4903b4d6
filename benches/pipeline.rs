//! Pipeline benchmark (a program, not a test): Korean messages through the real broker,
//! the worker and the embedded store, side by side with the encoder alone on the same
//! sentences, in one run.
//!
//!   cargo bench --bench pipeline -- [--messages 5000] [--latency-seconds 20]
//!                                   [--backlog 200000 --backlog-seconds 60]
//!                                   [--model multilingual-e5-small] [--prefix "passage: "]
//!                                   [--dtype f32|int8] [--threads N]
//!                                   [--f32-matmul high|highest|medium]
//!                                   [--chunking-rounds 3]
//!
//! `--model` names a folder under models/ (scripts/fetch-models.sh); the prefix defaults
//! to e5's "passage: " for e5 models and to nothing otherwise.
//!
//! Prints, one line each:
//!   encoder   sent/s of `streambed bench` on the same sentences (stream order, batch 32)
//!   pipeline  sustained sent/s from the first consumed message to the last confirmed
//!             upsert, with a backlog of --messages
//!   latency   p50/p95/p99 end-to-end (producer timestamp to confirmed upsert) at an
//!             offered load of half the sustained rate
//!   backlog   peak RSS of a worker process facing a --backlog message backlog
//!   chunking  (with --chunking-rounds R, instead of pipeline/latency/backlog) sustained
//!             sent/s of `chunk.mode = "split"` with the unchanged-document check (the
//!             defaults) and of `truncate` without it, interleaved over R rounds, fresh
//!             topic and store each; medians and the split/truncate ratio

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use streambed::metrics::Metrics;
use streambed::settings::Settings;
use streambed::util::quantile;
use support::*;

/// The value after `name` on the command line, or `default`.
fn sarg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn arg(name: &str, default: u64) -> u64 {
    sarg(name, "").parse().unwrap_or(default)
}

/// The model under test: folder, prefix and dtype, for the encoder and the worker alike.
struct ModelChoice {
    dir: std::path::PathBuf,
    prefix: String,
    dtype: String,
    /// `model.f32_matmul`: "high" (the default), "highest" or "medium".
    f32_matmul: String,
    /// `model.threads` for the worker (0: its default, all cores).
    threads: u64,
}

impl ModelChoice {
    fn from_args() -> Self {
        let name = sarg("--model", "multilingual-e5-small");
        let dir = models_dir().join(&name);
        assert!(
            dir.exists(),
            "{} missing: run scripts/fetch-models.sh",
            dir.display()
        );
        let default_prefix = if name.contains("e5") { "passage: " } else { "" };
        Self {
            dir,
            prefix: sarg("--prefix", default_prefix),
            dtype: sarg("--dtype", "f32"),
            f32_matmul: sarg("--f32-matmul", "high"),
            threads: arg("--threads", 0),
        }
    }

    fn options(&self) -> streambed::embed::EncoderOptions {
        use streambed::embed::Precision;
        let precision = match self.dtype.as_str() {
            "f32" => Precision::F32,
            "int8" => Precision::Int8,
            "bf16" => Precision::Bf16,
            other => panic!("--dtype {other}: use f32, int8 or bf16"),
        };
        let f32_matmul = serde_json::from_value(serde_json::Value::String(self.f32_matmul.clone()))
            .unwrap_or_else(|_| {
                panic!(
                    "--f32-matmul {}: use high, highest or medium",
                    self.f32_matmul
                )
            });
        streambed::embed::EncoderOptions {
            precision,
            f32_matmul,
            ..Default::default()
        }
    }

    /// The worker's environment with this model in place of the default one.
    fn apply(&self, env: Vec<(String, String)>) -> Vec<(String, String)> {
        let mut env: Vec<_> = env
            .into_iter()
            .filter(|(k, _)| k != "STREAMBED__MODEL__PATH")
            .collect();
        env.push((
            "STREAMBED__MODEL__PATH".into(),
            self.dir.to_string_lossy().into_owned(),
        ));
        env.push(("STREAMBED__MODEL__PREFIX".into(), self.prefix.clone()));
        env.push(("STREAMBED__MODEL__DTYPE".into(), self.dtype.clone()));
        env.push(("STREAMBED__MODEL__THREADS".into(), self.threads.to_string()));
        env.push((
            "STREAMBED__MODEL__F32_MATMUL".into(),
            self.f32_matmul.clone(),
        ));
        env
    }
}

fn messages(n: usize, tag: &str) -> Vec<Msg> {
    let base = korean_sentences(5000);
    (0..n)
        .map(|i| {
            let id = format!("{tag}-{i}");
            let text = &base[i % base.len()];
            let v = serde_json::json!({"id": id, "text": text});
            (Some(id.into_bytes()), Some(v.to_string().into_bytes()))
        })
        .collect()
}

fn settings(
    broker: &Broker,
    topic: &str,
    store: &std::path::Path,
    model: &ModelChoice,
) -> Settings {
    settings_with(broker, topic, store, model, &[])
}

fn settings_with(
    broker: &Broker,
    topic: &str,
    store: &std::path::Path,
    model: &ModelChoice,
    extra: &[(&str, &str)],
) -> Settings {
    let mut env = model.apply(worker_env(broker, topic, &unique("bench"), store));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env = env.into_iter().map(|(k, v)| {
        if k == "STREAMBED__METRICS__ADDR" {
            (k, String::new())
        } else {
            (k, v)
        }
    });
    Settings::load_from(None, env).expect("bench settings")
}

/// A worker running in this process, its counters watched directly.
struct InProcess {
    metrics: Metrics,
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn start(s: Settings) -> Self {
        let metrics = Metrics::new();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let worker = rt.spawn(streambed::run::run_with_metrics(
            s,
            metrics.clone(),
            async {
                let _ = stop_rx.await;
            },
        ));
        Self {
            metrics,
            rt,
            stop,
            worker,
        }
    }

    /// Sustained sent/s over a backlog of `n` messages, from the first consumed message
    /// to the last confirmed upsert.
    fn sustained(&self, n: usize) -> f64 {
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(3600);
        while self.metrics.upserted.get() < n as u64 {
            if first.is_none() && self.metrics.consumed.get() > 0 {
                first = Some(Instant::now());
            }
            assert!(Instant::now() < deadline, "pipeline did not finish");
            std::thread::sleep(Duration::from_millis(2));
        }
        n as f64 / first.unwrap().elapsed().as_secs_f64()
    }

    fn stop(self) {
        let _ = self.stop.send(());
        self.rt.block_on(self.worker).unwrap().unwrap();
    }
}

fn main() {
    let n = arg("--messages", 5000) as usize;
    let latency_seconds = arg("--latency-seconds", 20);
    let backlog = arg("--backlog", 0) as usize;
    let backlog_seconds = arg("--backlog-seconds", 60);
    let model = ModelChoice::from_args();
    println!(
        "model {} prefix={:?} dtype={} worker_threads={}",
        model.dir.display(),
        model.prefix,
        model.dtype,
        model.threads
    );
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let msgs = messages(n, "bench");

    // 1. Encoder alone, same sentences, the order a stream delivers them.
    {
        let m = streambed::embed::load_model(
            model.dir.to_str().unwrap(),
            &model.prefix,
            &model.options(),
        )
        .unwrap();
        let texts: Vec<String> = korean_sentences(5000)
            .into_iter()
            .cycle()
            .take(n.min(5000))
            .collect();
        for (label, sorted) in [("stream", false), ("length-sorted", true)] {
            let r = streambed::commands::bench_encoder(&m, &texts, 32, sorted).unwrap();
            println!(
                "encoder order={label} sent_per_s={:.1} tok_per_s={:.0} p50_batch_ms={:.1} sentences={}",
                r.sent_per_s, r.tok_per_s, r.p50_batch_ms, r.sentences
            );
        }
    }

    let rounds = arg("--chunking-rounds", 0);
    if rounds > 0 {
        let modes: [(&str, &[(&str, &str)]); 2] = [
            ("split", &[]),
            (
                "truncate",
                &[
                    ("STREAMBED__CHUNK__MODE", "truncate"),
                    ("STREAMBED__CHUNK__SKIP_UNCHANGED", "false"),
                ],
            ),
        ];
        let mut figures = vec![Vec::new(); 2];
        for round in 0..rounds {
            for (k, (label, extra)) in modes.iter().enumerate() {
                let topic = unique("chunking");
                broker.create_topic(&topic, 3);
                broker.produce(&topic, &msgs);
                let store = tempfile::tempdir().unwrap();
                let s = settings_with(&broker, &topic, store.path(), &model, extra);
                let w = InProcess::start(s);
                let r = w.sustained(n);
                w.stop();
                println!("chunking round={round} mode={label} sustained_sent_per_s={r:.1}");
                figures[k].push(r);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (a, b) = (median(&mut figures[0]), median(&mut figures[1]));
        println!(
            "chunking messages={n} rounds={rounds} split_median={a:.1} truncate_median={b:.1} ratio={:.3}",
            a / b
        );
        return;
    }

    // 2. Sustained pipeline throughput over a backlog.
    let topic = unique("bench");
    broker.create_topic(&topic, 3);
    broker.produce(&topic, &msgs);
    let w = InProcess::start(settings(&broker, &topic, dir.path(), &model));
    let (metrics, rt) = (&w.metrics, &w.rt);
    let sustained = w.sustained(n);
    println!("pipeline messages={n} sustained_sent_per_s={sustained:.1}");

    // 3. Latency at half capacity.
    *metrics.latency_samples.lock().unwrap() = Some(Vec::new());
    *metrics.consume_samples.lock().unwrap() = Some(Vec::new());
    let rate = sustained / 2.0;
    let total = (rate * latency_seconds as f64) as usize;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "0")
        .create()
        .unwrap();
    let paced = messages(total, "paced");
    let start = Instant::now();
    rt.block_on(async {
        let mut pending = Vec::new();
        for (i, (k, v)) in paced.iter().enumerate() {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
            let rec = FutureRecord::to(&topic)
                .key(k.as_deref().unwrap())
                .payload(v.as_deref().unwrap());
            // send_result enqueues now; send() would only enqueue when first polled, which
            // turns the paced load into one burst at the end.
            pending.push(producer.send_result(rec).map_err(|(e, _)| e).unwrap());
        }
        for p in pending {
            p.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    });
    while metrics.upserted.get() < (n + total) as u64 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut lat = metrics.latency_samples.lock().unwrap().take().unwrap();
    lat.sort_by(f64::total_cmp);
    println!(
        "latency offered_per_s={rate:.1} messages={} p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} peak_rss_mb={:.0}",
        lat.len(),
        quantile(&lat, 0.5) * 1000.0,
        quantile(&lat, 0.95) * 1000.0,
        quantile(&lat, 0.99) * 1000.0,
        streambed::util::peak_rss_mb()
    );
    let mut consumed = metrics.consume_samples.lock().unwrap().take().unwrap();
    consumed.sort_by(f64::total_cmp);
    println!(
        "consume_delay p50_ms={:.1} p95_ms={:.1} p99_ms={:.1} (event time to read from Kafka)",
        quantile(&consumed, 0.5) * 1000.0,
        quantile(&consumed, 0.95) * 1000.0,
        quantile(&consumed, 0.99) * 1000.0
    );
    let mean = |h: &prometheus::Histogram| h.get_sample_sum() / h.get_sample_count().max(1) as f64;
    let stage = |s: &str| mean(&metrics.stage_seconds.with_label_values(&[s])) * 1000.0;
    println!(
        "stages mean_batch_items={:.1} tokenize_ms={:.1} embed_ms={:.1} upsert_ms={:.1} batches={} consumed={} produced={}",
        mean(&metrics.batch_size),
        stage("tokenize"),
        stage("embed"),
        stage("upsert"),
        metrics.batches.get(),
        metrics.consumed.get(),
        n + total
    );
    w.stop();

    // 4. Memory under a large backlog, in a worker process of its own.
    if backlog > 0 {
        let topic = unique("backlog");
        broker.create_topic(&topic, 3);
        let t = Instant::now();
        let big = messages(backlog, "backlog");
        produce_fast(&broker.addr, &topic, backlog, |i| {
            let (k, v) = &big[i];
            (k.clone().unwrap(), v.clone().unwrap())
        });
        eprintln!("produced {backlog} in {:.0}s", t.elapsed().as_secs_f64());
        let store = tempfile::tempdir().unwrap();
        let env = model.apply(worker_env(
            &broker,
            &topic,
            &unique("backlog"),
            store.path(),
        ));
        let mut w = Worker::spawn(&["run"], &env, &store.path().join("worker.log"));
        let pid = w.pid();
        // Steady state from the moment the worker is ready: loading maps the weights file
        // and copies it, so the load-time high-water mark (VmHWM, also printed) counts the
        // model twice for a moment.
        wait_until("the worker to be ready", Duration::from_secs(120), || {
            w.http("/readyz").is_some_and(|r| r.0 == 200)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let peak = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0f64;
                let mut hwm = 0f64;
                let field = |s: &str, name: &str| -> f64 {
                    s.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                        .map_or(0.0, |kb| kb / 1024.0)
                };
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                        peak = peak.max(field(&s, "VmRSS:"));
                        hwm = hwm.max(field(&s, "VmHWM:"));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                (peak, hwm)
            })
        };
        std::thread::sleep(Duration::from_secs(backlog_seconds));
        let processed = w.metric("streambed_points_upserted_total");
        stop.store(true, Ordering::Relaxed);
        let (peak, hwm) = peak.join().unwrap();
        w.signal(libc::SIGTERM);
        let _ = w.wait(Duration::from_secs(60));
        let model_mb = std::fs::metadata(model.dir.join("model.safetensors"))
            .unwrap()
            .len() as f64
            / 1048576.0;
        println!(
            "backlog messages={backlog} seconds={backlog_seconds} processed={processed:.0} peak_rss_mb={peak:.0} (after ready; load-time VmHWM {hwm:.0}) model_file_mb={model_mb:.0} over_model_mb={:.0}",
            peak - model_mb
        );
    }
}
