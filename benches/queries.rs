//! Query latency benchmark (a program, not a test): single-query `/embed` and `/search`
//! on a worker that is idle, then on the same worker while it ingests a backlog, with the
//! ingestion throughput during that window. Real broker, worker process, embedded store.
//!
//!   cargo bench --bench queries -- [--backlog 200000] [--queries 200] [--model multilingual-e5-small]
//!
//! Prints, one line each:
//!   idle      p50/p99 ms of /embed and /search, one request at a time
//!   loaded    the same while the worker works through --backlog messages, and the
//!             messages/s it ingested meanwhile

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use streambed::util::quantile;
use support::*;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn post(addr: &str, path: &str, body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

/// p50 and p99 in ms of `n` sequential requests of each kind, alternating.
fn measure(addr: &str, queries: &[String], n: usize) -> ((f64, f64), (f64, f64)) {
    let (mut embed, mut search) = (Vec::new(), Vec::new());
    for i in 0..n {
        let q = serde_json::Value::String(queries[i % queries.len()].clone()).to_string();
        let t = Instant::now();
        assert_eq!(post(addr, "/embed", &format!("{{\"inputs\": {q}}}")), 200);
        embed.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        assert_eq!(
            post(
                addr,
                "/search",
                &format!("{{\"query\": {q}, \"top_k\": 5}}")
            ),
            200
        );
        search.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    embed.sort_by(f64::total_cmp);
    search.sort_by(f64::total_cmp);
    (
        (quantile(&embed, 0.5), quantile(&embed, 0.99)),
        (quantile(&search, 0.5), quantile(&search, 0.99)),
    )
}

fn main() {
    let backlog = arg("--backlog", 200_000) as usize;
    let n = arg("--queries", 200) as usize;
    let broker = Broker::start();
    let topic = unique("queries");
    broker.create_topic(&topic, 3);
    let dir = tempfile::tempdir().unwrap();
    // A first few thousand points, so searches have something to find.
    let seed = korean_json_messages(2000, "seed");
    let ends = broker.produce(&topic, &seed);
    let group = unique("group");
    let env = worker_env(&broker, &topic, &group, dir.path());
    let w = Worker::spawn(&["run"], &env, &dir.path().join("worker.log"));
    broker.wait_committed(&group, &topic, &ends, Duration::from_secs(900));
    let queries: Vec<String> = korean_sentences(3000)[2000..].to_vec();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "cpu {cpu:?} cores {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let ((e50, e99), (s50, s99)) = measure(&w.metrics_addr, &queries, n);
    println!("idle   requests={n} embed_p50_ms={e50:.1} embed_p99_ms={e99:.1} search_p50_ms={s50:.1} search_p99_ms={s99:.1}");

    // The backlog, produced as fast as the broker takes it. Distinct ids: every message
    // is new work (none is skipped as unchanged).
    let sentences = korean_sentences(5000);
    produce_fast(&broker.addr, &topic, backlog, |i| {
        let key = format!("b-{i}");
        let value = serde_json::json!({"id": key, "text": sentences[i % sentences.len()]});
        (key.into_bytes(), value.to_string().into_bytes())
    });
    let before = w.metric("streambed_points_upserted_total");
    wait_until("ingestion to start", Duration::from_secs(60), || {
        w.metric("streambed_points_upserted_total") > before + 64.0
    });
    let (start_points, t) = (w.metric("streambed_points_upserted_total"), Instant::now());
    let ((e50, e99), (s50, s99)) = measure(&w.metrics_addr, &queries, n);
    let rate =
        (w.metric("streambed_points_upserted_total") - start_points) / t.elapsed().as_secs_f64();
    println!(
        "loaded requests={n} embed_p50_ms={e50:.1} embed_p99_ms={e99:.1} search_p50_ms={s50:.1} search_p99_ms={s99:.1} ingest_msgs_per_s={rate:.1} backlog={backlog}"
    );
}
