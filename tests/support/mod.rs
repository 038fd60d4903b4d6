//! Test support: a real Kafka-protocol broker (tansu), the worker binary as a child
//! process, Kafka helpers, and read access to the embedded store once a worker stopped.
//! Every test uses its own topic, group, store folder and ports, so tests can run in
//! parallel; the heavy ones take `heavy()` to keep a 2-core machine responsive.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, TopicPartitionList};

static HEAVY: Mutex<()> = Mutex::new(());

/// Serialises tests that run the model in a child process.
pub fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where scripts/fetch-models.sh put the test models.
pub fn models_dir() -> PathBuf {
    std::env::var_os("STREAMBED_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models"))
}

/// The Korean-capable test model (scripts/fetch-models.sh).
pub fn e5_model() -> PathBuf {
    let dir = models_dir().join("multilingual-e5-small");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        dir.display()
    );
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Waits for `cond` with a deadline, polling.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A tansu broker on a free loopback port, in-memory storage, killed on drop.
pub struct Broker {
    child: Child,
    pub addr: String,
}

impl Broker {
    /// Starts tansu and waits until it answers a metadata request. A port taken between
    /// `free_port` and tansu's bind, or a broker that listens but does not answer, is
    /// retried on a new port (CI once saw an admin request time out on a fresh broker).
    pub fn start() -> Self {
        let bin = std::env::var_os("STREAMBED_TANSU")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".tools/tansu"));
        assert!(
            bin.exists(),
            "{} is missing: run scripts/fetch-broker.sh first",
            bin.display()
        );
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(&bin) {
                Ok(b) => return b,
                Err(e) => last = e,
            }
        }
        panic!("the broker did not start: {last}");
    }

    fn try_start(bin: &Path) -> Result<Self, String> {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("streambed-tansu-{port}.log"));
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_or(Stdio::null(), Stdio::from))
            .spawn()
            .expect("start tansu");
        let addr = format!("127.0.0.1:{port}");
        let mut broker = Broker { child, addr };
        let tail = |b: &mut Broker| {
            let _ = b.child.kill();
            let _ = b.child.wait();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let start = text.len().saturating_sub(2000);
            text.get(start..).unwrap_or_default().to_string()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&broker.addr).is_err() {
            if Instant::now() > deadline || broker.exited() {
                let addr = broker.addr.clone();
                return Err(format!("not listening on {addr}: {}", tail(&mut broker)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let consumer: BaseConsumer = broker.config().create().unwrap();
        let answered = consumer
            .fetch_metadata(None, Duration::from_secs(15))
            .is_ok();
        if !answered || broker.exited() {
            let addr = broker.addr.clone();
            return Err(format!("no metadata from {addr}: {}", tail(&mut broker)));
        }
        let _ = std::fs::remove_file(&log);
        Ok(broker)
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.addr);
        c
    }

    /// Creates a topic; an admin request that times out is retried (and "already
    /// exists" on a retry means the first attempt got through).
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::types::RDKafkaErrorCode;
        let admin: AdminClient<_> = self.config().create().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let options = AdminOptions::new()
            .request_timeout(Some(Duration::from_secs(20)))
            .operation_timeout(Some(Duration::from_secs(20)));
        let mut last = None;
        for attempt in 0..3 {
            let new = [NewTopic::new(topic, partitions, TopicReplication::Fixed(1))];
            match rt.block_on(admin.create_topics(&new, &options)) {
                Ok(results) => {
                    for r in results {
                        match r {
                            Ok(_) => {}
                            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if attempt > 0 => {}
                            Err(e) => panic!("creating topic {topic}: {e:?}"),
                        }
                    }
                    return;
                }
                Err(e) => last = Some(e),
            }
        }
        panic!("creating topic {topic}: {last:?}");
    }

    /// Produces records (key, value; `None` value is a tombstone) and returns the end
    /// offset per partition.
    pub fn produce(&self, topic: &str, records: &[Msg]) -> HashMap<i32, i64> {
        produce_to(&self.addr, topic, records)
    }

    /// The group's committed offsets for `topic`'s partitions.
    pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
        committed_at(&self.addr, group, topic, partitions)
    }

    /// Waits until the group committed everything up to `ends`.
    pub fn wait_committed(
        &self,
        group: &str,
        topic: &str,
        ends: &HashMap<i32, i64>,
        timeout: Duration,
    ) {
        let n = ends.keys().max().map_or(0, |m| m + 1);
        wait_until("offsets committed to the end", timeout, || {
            let c = self.committed(group, topic, n);
            ends.iter().all(|(p, end)| c.get(p) == Some(end))
        });
    }

    /// Reads a topic from the beginning, expecting exactly `n` records: it waits for them
    /// (up to `timeout`), then keeps reading for a quiet spell so that extra records (a
    /// duplicate dead letter) are seen too, and asserts the count.
    pub fn read(&self, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
        let mut quiet_since: Option<(usize, Instant)> = None;
        let got = self.read_until(topic, timeout, |got| {
            if got.len() < n {
                return false;
            }
            match quiet_since {
                Some((len, at)) if len == got.len() => at.elapsed() > Duration::from_secs(3),
                _ => {
                    quiet_since = Some((got.len(), Instant::now()));
                    false
                }
            }
        });
        assert_eq!(got.len(), n, "records on {topic}: {got:?}");
        got
    }

    /// Reads a topic from the beginning until `done` says so or `timeout` passes.
    pub fn read_until(
        &self,
        topic: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Record]) -> bool,
    ) -> Vec<Record> {
        let c: BaseConsumer = self
            .config()
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while !done(&out) && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A group's committed offsets for `topic`'s partitions, from the broker at `addr`.
pub fn committed_at(addr: &str, group: &str, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    match c.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(t) => t
            .elements()
            .iter()
            .filter_map(|e| {
                e.offset()
                    .to_raw()
                    .filter(|o| *o >= 0)
                    .map(|o| (e.partition(), o))
            })
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// Produces records to the broker at `addr` and returns the end offset per partition. One
/// message per request: tansu reports watermarks early for multi-message batches.
pub fn produce_to(addr: &str, topic: &str, records: &[Msg]) -> HashMap<i32, i64> {
    produce_with(addr, topic, records, &[])
}

/// [`produce_to`] with extra producer properties (e.g. `message.max.bytes`).
pub fn produce_with(
    addr: &str,
    topic: &str,
    records: &[Msg],
    properties: &[(&str, &str)],
) -> HashMap<i32, i64> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", addr)
        .set("batch.num.messages", "1")
        .set("enable.idempotence", "true");
    for (k, v) in properties {
        config.set(*k, *v);
    }
    let producer: FutureProducer = config.create().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut ends = HashMap::new();
    rt.block_on(async {
        // send_result enqueues at once (send() only when first polled); on a full local
        // queue, wait for earlier deliveries and try again.
        let mut pending = std::collections::VecDeque::new();
        for (k, v) in records {
            loop {
                let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
                if let Some(k) = k {
                    rec = rec.key(k.as_slice());
                }
                if let Some(v) = v {
                    rec = rec.payload(v.as_slice());
                }
                match producer.send_result(rec) {
                    Ok(f) => {
                        pending.push_back(f);
                        break;
                    }
                    Err((e, _)) => {
                        assert!(
                            e.rdkafka_error_code()
                                == Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                            "produce: {e}"
                        );
                        let f = pending.pop_front().expect("a queue is full of something");
                        note(&mut ends, f.await);
                    }
                }
            }
        }
        for f in pending {
            note(&mut ends, f.await);
        }
    });
    ends
}

fn note(
    ends: &mut HashMap<i32, i64>,
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) {
    let d = r
        .expect("producer alive")
        .map_err(|(e, _)| e)
        .expect("delivered");
    let e = ends.entry(d.partition).or_insert(0);
    *e = (*e).max(d.offset + 1);
}

/// Produces `n` records made by `record(i)` (key, value) as fast as the broker takes
/// them: librdkafka's local queue stays full, and when it refuses, the oldest delivery is
/// awaited first. For backlogs of hundreds of thousands of records.
pub fn produce_fast(
    addr: &str,
    topic: &str,
    n: usize,
    record: impl Fn(usize) -> (Vec<u8>, Vec<u8>),
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut pending = std::collections::VecDeque::new();
        for i in 0..n {
            let (k, v) = record(i);
            loop {
                let rec = FutureRecord::to(topic).key(&k).payload(&v);
                match producer.send_result(rec) {
                    Ok(f) => {
                        pending.push_back(f);
                        break;
                    }
                    // Local queue full: wait for the oldest delivery, then retry.
                    Err(_) => {
                        let f = pending.pop_front().expect("queue full of something");
                        f.await.unwrap().map_err(|(e, _)| e).unwrap();
                    }
                }
            }
        }
        for p in pending {
            p.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    });
}

/// What most stream tests start with: a broker, a topic with `partitions` partitions, a
/// group id and a scratch folder, all fresh.
pub struct Scenario {
    pub broker: Broker,
    pub topic: String,
    pub group: String,
    pub dir: tempfile::TempDir,
}

impl Scenario {
    pub fn new(partitions: i32) -> Self {
        let broker = Broker::start();
        let topic = unique("events");
        broker.create_topic(&topic, partitions);
        Scenario {
            broker,
            topic,
            group: unique("group"),
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

/// A record to produce: key and value (`None` value: a tombstone).
pub type Msg = (Option<Vec<u8>>, Option<Vec<u8>>);

#[derive(Debug)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

/// Settings for a worker against `broker`, as STREAMBED__* variables.
pub fn worker_env(
    broker: &Broker,
    topic: &str,
    group: &str,
    store: &Path,
) -> Vec<(String, String)> {
    worker_env_at(&broker.addr, topic, group, store)
}

/// [`worker_env`] for any bootstrap address (e.g. librdkafka's mock cluster).
pub fn worker_env_at(addr: &str, topic: &str, group: &str, store: &Path) -> Vec<(String, String)> {
    [
        ("STREAMBED__KAFKA__BROKERS", addr.to_string()),
        ("STREAMBED__KAFKA__TOPICS", topic.to_string()),
        ("STREAMBED__KAFKA__GROUP_ID", group.to_string()),
        (
            "STREAMBED__KAFKA__DEAD_LETTER_TOPIC",
            format!("{topic}-dlq"),
        ),
        ("STREAMBED__KAFKA__SESSION_TIMEOUT_MS", "6000".into()),
        ("STREAMBED__KAFKA__HEARTBEAT_INTERVAL_MS", "500".into()),
        (
            "STREAMBED__MODEL__PATH",
            e5_model().to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__EMBEDDED__PATH",
            store.to_string_lossy().into_owned(),
        ),
        (
            "STREAMBED__METRICS__ADDR",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("STREAMBED__SHUTDOWN__DEADLINE_MS", "20000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The worker binary as a child process; killed on drop.
pub struct Worker {
    child: Option<Child>,
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl Worker {
    pub fn spawn(args: &[&str], env: &[(String, String)], log: &Path) -> Self {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::spawn_bin(Path::new(env!("CARGO_BIN_EXE_streambed")), &args, env, log)
    }

    /// Any program as a child process, logging to `log`.
    pub fn spawn_bin(bin: &Path, args: &[String], env: &[(String, String)], log: &Path) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .current_dir(log.parent().unwrap())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "streambed=debug,warn")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn worker");
        let metrics_addr = env
            .iter()
            .find(|(k, _)| k == "STREAMBED__METRICS__ADDR")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Worker {
            child: Some(child),
            metrics_addr,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for exit; returns the exit code (None if killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then expects a clean exit (code 0) within 30 s.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let code = self.wait(Duration::from_secs(30));
        assert_eq!(
            code,
            Some(0),
            "worker did not exit cleanly; log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL; returns the exit code (`None`: it died of the signal, as it should).
    pub fn kill9(&mut self) -> Option<i32> {
        self.signal(libc::SIGKILL);
        self.wait(Duration::from_secs(10))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path of the metrics server: (status, body); None while it is not up.
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics_addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        Some((status, body))
    }

    /// A metric's value summed over its label sets (0 when the worker exports none of
    /// it yet). Panics when `/metrics` cannot be read: an unreachable worker is not 0.
    pub fn metric(&self, name: &str) -> f64 {
        self.metric_opt(name).unwrap_or_else(|| {
            panic!(
                "/metrics at {} unreachable; log:\n{}",
                self.metrics_addr,
                self.log_text()
            )
        })
    }

    /// [`metric`](Self::metric), `None` while `/metrics` is unreachable (for waits).
    pub fn metric_opt(&self, name: &str) -> Option<f64> {
        let (status, body) = self.http("/metrics")?;
        if status != 200 {
            return None;
        }
        Some(
            body.lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| l.split(['{', ' ']).next() == Some(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                // (an empty f64 sum is -0.0)
                .fold(0.0, |a, b| a + b),
        )
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        wait_until("/readyz 200", timeout, || {
            self.http("/readyz").map(|r| r.0) == Some(200)
        });
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Opens an embedded store (the worker must have stopped) and reads every point.
pub fn read_store(path: &Path, dim: usize) -> HashMap<String, streambed::sink::Hit> {
    read_store_at(&path.join("streambed"), dim)
}

/// `n` JSON messages of KorSTS sentences, keyed and identified `{prefix}-{i}`.
pub fn korean_json_messages(n: usize, prefix: &str) -> Vec<Msg> {
    korean_sentences(n)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let id = format!("{prefix}-{i}");
            (
                Some(id.clone().into_bytes()),
                Some(
                    serde_json::json!({"id": id, "text": s})
                        .to_string()
                        .into_bytes(),
                ),
            )
        })
        .collect()
}

/// KorSTS sentences, distinct, in file order.
pub fn korean_sentences(n: usize) -> Vec<String> {
    let pairs = streambed::sts::load_pairs(&repo().join("datasets/korsts/sts-train.tsv")).unwrap();
    let mut s = streambed::sts::sentences(&pairs);
    assert!(s.len() >= n, "only {} sentences", s.len());
    s.truncate(n);
    s
}

/// The Qdrant-protocol test server's binary (crates/qdrant-test-server), built into the
/// same target folder as the tests (`cargo build --workspace`, as scripts/test.sh does).
pub fn test_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("STREAMBED_QDRANT_TEST_SERVER") {
        return PathBuf::from(p);
    }
    // tests run from target/<profile>/deps/
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("qdrant-test-server");
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo build --release --workspace)",
        bin.display()
    );
    bin
}

/// The Qdrant endpoint for tests: a real Qdrant when `QDRANT_URL` is set (gRPC URL, with
/// `QDRANT_API_KEY` if it needs one), else the Qdrant-protocol test server as a child
/// process (restartable). Points are read back through the real client in both cases.
pub struct QdrantUnderTest {
    pub url: String,
    pub real: bool,
    pub api_key: Option<String>,
    server: Option<Worker>,
    listen: String,
    path: PathBuf,
    max_request_bytes: usize,
}

impl QdrantUnderTest {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, 4 * 1024 * 1024, None)
    }

    /// The test server with a request size limit and an API key (a real Qdrant keeps its
    /// own settings: these are then only what the tests expect of it).
    pub fn start_with(dir: &Path, max_request_bytes: usize, api_key: Option<&str>) -> Self {
        if let Ok(url) = std::env::var("QDRANT_URL") {
            return Self {
                url,
                real: true,
                api_key: std::env::var("QDRANT_API_KEY").ok(),
                server: None,
                listen: String::new(),
                path: PathBuf::new(),
                max_request_bytes,
            };
        }
        let listen = format!("127.0.0.1:{}", free_port());
        let mut q = Self {
            url: format!("http://{listen}"),
            real: false,
            api_key: api_key.map(str::to_string),
            server: None,
            listen,
            path: dir.join("qdrant"),
            max_request_bytes,
        };
        q.up();
        q
    }

    /// (Re)starts the test server on the same port and data folder.
    pub fn up(&mut self) {
        assert!(!self.real, "a real Qdrant is not restarted by tests");
        let log = self
            .path
            .with_extension(format!("{}.log", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&self.path).unwrap();
        let mut args = vec![
            "--listen".to_string(),
            self.listen.clone(),
            "--path".to_string(),
            self.path.to_string_lossy().into_owned(),
            "--max-request-bytes".to_string(),
            self.max_request_bytes.to_string(),
        ];
        if let Some(k) = &self.api_key {
            args.push("--api-key".into());
            args.push(k.clone());
        }
        let w = Worker::spawn_bin(&test_server_bin(), &args, &[], &log);
        let addr = self.listen.clone();
        wait_until(
            "the Qdrant test server to listen",
            Duration::from_secs(20),
            || std::net::TcpStream::connect(&addr).is_ok(),
        );
        self.server = Some(w);
    }

    /// Kills the test server (an outage: connections refused).
    pub fn down(&mut self) {
        if let Some(mut w) = self.server.take() {
            w.kill9();
        }
    }

    /// Switches a fault of the test server on (`Some(contents)`) or off (`None`):
    /// `fail-writes`, `slow-writes` (milliseconds). See crates/qdrant-test-server.
    pub fn fault(&self, name: &str, contents: Option<&str>) {
        assert!(!self.real, "faults are injected into the test server only");
        let f = self.path.join(name);
        match contents {
            Some(c) => std::fs::write(f, c).unwrap(),
            None => {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    /// Points of a collection read straight from the test server's folder: exact at the
    /// moment the server was killed (call after [`down`](Self::down)).
    pub fn read_offline(
        &self,
        collection: &str,
        dim: usize,
    ) -> HashMap<String, streambed::sink::Hit> {
        assert!(
            !self.real && self.server.is_none(),
            "stop the test server first"
        );
        read_store_at(&self.path.join(collection).join("shard"), dim)
    }

    /// A client for this endpoint (with its API key).
    /// Its timeout is generous: on a 2-core machine running a worker and other tests, the
    /// client's 5 s default was once too short for a collection delete (a flake, not a
    /// finding).
    pub fn client(&self) -> qdrant_client::Qdrant {
        let mut b = qdrant_client::Qdrant::from_url(&self.url)
            .timeout(std::time::Duration::from_secs(60))
            .skip_compatibility_check();
        if let Some(k) = &self.api_key {
            b = b.api_key(k.clone());
        }
        b.build().unwrap()
    }

    /// Environment for a worker writing to `collection` here.
    pub fn worker_env(&self, collection: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("STREAMBED__SINK__KIND".to_string(), "qdrant".to_string()),
            ("STREAMBED__QDRANT__URL".to_string(), self.url.clone()),
            (
                "STREAMBED__QDRANT__COLLECTION".to_string(),
                collection.to_string(),
            ),
        ];
        if let Some(k) = &self.api_key {
            env.push(("STREAMBED__QDRANT__API_KEY".to_string(), k.clone()));
        }
        env
    }

    /// Every point of a collection with payload and vector, through the real client's
    /// scroll (works against a real Qdrant and the test server alike, while it runs).
    pub fn read_collection(
        &self,
        collection: &str,
        _dim: usize,
    ) -> HashMap<String, streambed::sink::Hit> {
        use qdrant_client::qdrant::{point_id::PointIdOptions, ScrollPointsBuilder};
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = self.client();
        rt.block_on(async {
            let mut out = HashMap::new();
            let mut offset = None;
            loop {
                let mut req = ScrollPointsBuilder::new(collection)
                    .limit(1000)
                    .with_payload(true)
                    .with_vectors(true);
                if let Some(o) = offset.take() {
                    req = req.offset(o);
                }
                let page = client.scroll(req).await.unwrap();
                for p in page.result {
                    let id = match p.id.and_then(|i| i.point_id_options) {
                        Some(PointIdOptions::Uuid(u)) => u,
                        Some(PointIdOptions::Num(n)) => n.to_string(),
                        None => String::new(),
                    };
                    #[allow(deprecated)]
                    let vector = p.vectors.and_then(|v| match v.vectors_options {
                        Some(qdrant_client::qdrant::vectors_output::VectorsOptions::Vector(v)) => {
                            match v.vector {
                                Some(qdrant_client::qdrant::vector_output::Vector::Dense(d)) => {
                                    Some(d.data)
                                }
                                None => Some(v.data),
                                _ => None,
                            }
                        }
                        _ => None,
                    });
                    let payload = p
                        .payload
                        .into_iter()
                        .map(|(k, v)| (k, v.into_json()))
                        .collect();
                    out.insert(
                        id.clone(),
                        streambed::sink::Hit {
                            id,
                            score: 0.0,
                            payload,
                            vector,
                        },
                    );
                }
                match page.next_page_offset {
                    Some(o) => offset = Some(o),
                    None => return out,
                }
            }
        })
    }
}
/// Reads every point of an embedded shard folder (no process may hold it).
pub fn read_store_at(shard: &Path, dim: usize) -> HashMap<String, streambed::sink::Hit> {
    use streambed::sink::embedded::EmbeddedSink;
    use streambed::sink::Sink;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sink = EmbeddedSink::open(shard.to_path_buf(), None);
        sink.ensure_collection(dim).await.unwrap();
        sink.scroll_all().await.unwrap()
    })
    .into_iter()
    .map(|h| (h.id.clone(), h))
    .collect()
}
