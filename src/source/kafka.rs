//! The Kafka source: a consumer-group member that decodes records into pipeline items,
//! stores offsets only for finished work (contiguous prefix per partition), drains revoked
//! partitions before letting them go, pauses when the pipeline is full, and dead-letters
//! bad records to a topic with headers saying why.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::decode::{decode, Decoded, Record, Rejection};
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, Tp};
use crate::pipeline::{Completion, DeadLetters, DeliveryError, Hold, Item, Op, Origin};
use crate::settings::{is_secret_property, KafkaSettings, MessageSettings};
use crate::util::blocking_here;

pub type Tracker = Arc<Mutex<OffsetTracker>>;

/// How long the pipeline may stay full before the assignment is paused. Short enough to
/// keep the consumer polling (heartbeats are librdkafka's own; rebalances need polls),
/// long enough that normal backpressure does not pause and resume fetching all the time.
const PAUSE_AFTER: Duration = Duration::from_millis(1000);

/// Header names on dead-letter records.
pub const H_REASON: &str = "streambed.reason";
pub const H_ERROR: &str = "streambed.error";
pub const H_CLASS: &str = "streambed.error_class";
pub const H_TOPIC: &str = "streambed.original_topic";
pub const H_PARTITION: &str = "streambed.original_partition";
pub const H_OFFSET: &str = "streambed.original_offset";
/// Present when the dead letter carries only the start of the original value: the
/// original length in bytes.
pub const H_TRUNCATED: &str = "streambed.original_bytes";

/// The most bytes of an original value a dead letter carries. Kafka's default largest
/// message is 1 MB (librdkafka's `message.max.bytes`, the broker's `message.max.bytes`);
/// a 10 MB record must still be dead-lettered, so its value is cut and the original length
/// noted in a header.
pub const DEAD_LETTER_MAX_VALUE: usize = 512 * 1024;

/// Consumer callbacks: lag from librdkafka statistics, drain-then-commit on revoke.
pub struct SourceContext {
    tracker: Tracker,
    metrics: Metrics,
    drain_timeout: Duration,
    /// Set when the worker shuts down: no revoke drain runs past it.
    shutdown_deadline: Mutex<Option<Instant>>,
    /// Whether the last commit left nothing stored uncommitted (it succeeded, or found
    /// nothing to commit): at shutdown, what decides whether a group leave that did not
    /// finish in time costs anything.
    offsets_settled: std::sync::atomic::AtomicBool,
}

/// Whether a commit's outcome leaves nothing stored uncommitted: it succeeded, or found
/// nothing to commit (`NoOffset`).
fn commit_settles(result: &rdkafka::error::KafkaResult<()>) -> bool {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    matches!(
        result,
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
    )
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (p, part) in t.partitions {
                if p >= 0 && part.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }
}

fn tps(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl SourceContext {
    /// Bounds every later revoke drain (the one run by closing the consumer) by `at`.
    pub fn set_shutdown_deadline(&self, at: Instant) {
        *self.shutdown_deadline.lock().expect("deadline") = Some(at);
    }

    /// Notes a commit's outcome: settled if it succeeded or there was nothing to commit
    /// (librdkafka's `NoOffset`: every stored offset is committed already). A commit
    /// refused mid-rebalance (`RebalanceInProgress`) leaves its offsets stored for the
    /// next one, so it is not settled.
    pub fn note_commit(&self, result: &rdkafka::error::KafkaResult<()>) {
        self.offsets_settled
            .store(commit_settles(result), std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the last commit settled every stored offset ([`SourceContext::note_commit`]).
    pub fn offsets_settled(&self) -> bool {
        self.offsets_settled
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn drain(&self, revoked: &[Tp]) {
        let mut deadline = Instant::now() + self.drain_timeout;
        if let Some(at) = *self.shutdown_deadline.lock().expect("deadline") {
            deadline = deadline.min(at);
        }
        loop {
            let left: usize = {
                let t = self.tracker.lock().expect("tracker lock");
                revoked.iter().map(|tp| t.in_flight(tp)).sum()
            };
            if left == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(left, "revoked partitions not drained in time; their tail will be replayed by the next owner");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until no write of the revoked partitions is in flight. Their holds were taken
    /// before the revoke (later ones fail), and each write is bounded by the store's
    /// request timeout, so this ends; it is not cut short, since returning early would let
    /// a stale write land over the new owner's.
    fn wait_for_writes(&self, revoked: &[Tp]) {
        let started = Instant::now();
        let mut warned = Duration::ZERO;
        loop {
            let writing: usize = {
                let t = self.tracker.lock().expect("tracker lock");
                revoked.iter().map(|tp| t.writing(tp)).sum()
            };
            if writing == 0 {
                return;
            }
            // Leaving the group at shutdown: the process is about to exit, so no write
            // of these partitions can start after this; do not outlast the deadline.
            if self
                .shutdown_deadline
                .lock()
                .expect("deadline")
                .is_some_and(|at| Instant::now() >= at)
            {
                tracing::warn!(
                    writing,
                    "shutdown deadline passed with store writes in flight"
                );
                return;
            }
            if started.elapsed() >= warned + Duration::from_secs(10) {
                warned = started.elapsed();
                tracing::warn!(
                    writing,
                    waited_s = warned.as_secs(),
                    "revoke waits for store writes of the revoked partitions"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked = tps(tpl);
            // Let the pipeline finish what it holds for these partitions, so their offsets
            // are committed by us rather than replayed by the next owner; then fence off
            // whatever did not finish in time. All of it blocks, so it runs where it does
            // not stall a runtime worker (this callback runs inside the consumer's poll).
            blocking_here(|| {
                self.drain(&revoked);
                let committed = consumer.commit_consumer_state(CommitMode::Sync);
                self.note_commit(&committed);
                match committed {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "commit on revoke (nothing stored is normal)")
                    }
                }
                let left: usize = {
                    let mut t = self.tracker.lock().expect("tracker lock");
                    let left = revoked.iter().map(|tp| t.in_flight(tp)).sum();
                    for tp in &revoked {
                        t.revoke(tp);
                    }
                    left
                };
                self.wait_for_writes(&revoked);
                if left > 0 {
                    self.metrics.fenced.inc_by(left as u64);
                }
                tracing::info!(partitions = ?revoked, unfinished = left, "partitions revoked; unfinished records are fenced off and left to the next owner");
            });
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                {
                    let mut t = self.tracker.lock().expect("tracker lock");
                    for tp in tps(tpl) {
                        t.assign(&tp);
                    }
                }
                // librdkafka keeps a partition's pause flag across a revoke and a later
                // re-assignment; a fresh assignment starts unpaused (the reader pauses
                // again if the pipeline is still full).
                if let Err(e) = consumer.resume(tpl) {
                    tracing::debug!(error = %e, "resume on assign");
                }
                tracing::info!(partitions = ?tps(tpl), "partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics
            .ready
            .source_ready
            .store(assigned > 0, std::sync::atomic::Ordering::Relaxed);
    }
}

pub type KafkaConsumer = StreamConsumer<SourceContext>;

/// librdkafka client settings common to consumer and producer: brokers plus the
/// pass-through properties (`_` in keys from environment variables becomes `.`).
/// Values are never logged.
fn base_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, value) in &k.properties {
        let key = key.replace('_', ".");
        tracing::debug!(property = %key, secret = is_secret_property(&key), "setting librdkafka property");
        c.set(key, value);
    }
    c
}

pub fn consumer(
    k: &KafkaSettings,
    tracker: Tracker,
    metrics: Metrics,
    drain_timeout: Duration,
) -> anyhow::Result<Arc<KafkaConsumer>> {
    let mut c = base_config(k);
    c.set("group.id", &k.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("session.timeout.ms", k.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", k.heartbeat_interval_ms.to_string())
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false");
    // Bound what librdkafka prefetches (default 64 MiB per consumer).
    default_property(&mut c, k, "queued.max.messages.kbytes", "16384");
    // How long the broker may hold a fetch when no data is there. 500 ms (the default) is
    // added to the latency of a quiet stream on brokers that hold fetches to the limit
    // (tansu does); 100 ms costs a few idle fetches per second.
    default_property(&mut c, k, "fetch.wait.max.ms", "100");
    let consumer: KafkaConsumer = c
        .create_with_context(SourceContext {
            tracker,
            metrics,
            drain_timeout,
            shutdown_deadline: Mutex::new(None),
            offsets_settled: std::sync::atomic::AtomicBool::new(false),
        })
        .map_err(redacted)?;
    let topics: Vec<&str> = k.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(Arc::new(consumer))
}

pub fn producer(k: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    let mut c = base_config(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    c.create().map_err(redacted)
}

/// librdkafka's configuration errors quote the property's value; a secret one must not
/// reach the log that way.
fn redacted(e: rdkafka::error::KafkaError) -> anyhow::Error {
    match e {
        rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
            let value = if is_secret_property(&key) {
                "<redacted>"
            } else {
                value.as_str()
            };
            anyhow::anyhow!("librdkafka refused kafka.properties {key:?} = {value:?}: {desc}")
        }
        other => other.into(),
    }
}

/// Commits finished offsets: stores the contiguous finished prefix for librdkafka's
/// auto-commit (and the explicit commits on revoke and shutdown).
pub struct KafkaCompletion {
    pub consumer: Arc<KafkaConsumer>,
    pub tracker: Tracker,
    pub metrics: Metrics,
}

impl Completion for KafkaCompletion {
    fn done(&self, origins: &[Origin]) {
        let mut advanced: HashMap<Tp, i64> = HashMap::new();
        {
            let mut t = self.tracker.lock().expect("tracker lock");
            for o in origins {
                if let Origin::Kafka {
                    topic,
                    partition,
                    offset,
                    generation,
                } = o
                {
                    let tp = (topic.to_string(), *partition);
                    if let Some(next) = t.complete(&tp, *generation, *offset) {
                        advanced.insert(tp, next);
                    }
                }
            }
            self.metrics.in_flight.set(t.total_in_flight() as i64);
        }
        if advanced.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &advanced {
            if tpl
                .add_partition_offset(topic, *partition, Offset::Offset(*next))
                .is_ok()
            {
                self.metrics
                    .committed_offset
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(*next);
            }
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile; its next owner replays from the last commit.
            tracing::debug!(error = %e, "could not store offsets");
        }
    }

    fn hold(&self, origins: &[&Origin]) -> Hold {
        let items: Vec<(Tp, u64)> = origins
            .iter()
            .map(|o| match o {
                Origin::Kafka {
                    topic,
                    partition,
                    generation,
                    ..
                } => ((topic.to_string(), *partition), *generation),
                Origin::File { .. } => unreachable!("the Kafka source makes Kafka origins"),
            })
            .collect();
        let owned = self.tracker.lock().expect("tracker lock").hold(&items);
        let held: Vec<(Tp, u64)> = items
            .into_iter()
            .zip(&owned)
            .filter(|(_, o)| **o)
            .map(|(i, _)| i)
            .collect();
        let tracker = self.tracker.clone();
        Hold::new(owned, move || {
            tracker.lock().expect("tracker lock").release(&held);
        })
    }
}

/// Producer errors a retry will not fix.
fn delivery_error(e: rdkafka::error::KafkaError) -> DeliveryError {
    use rdkafka::types::RDKafkaErrorCode as C;
    let permanent = matches!(
        e.rdkafka_error_code(),
        Some(
            C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::InvalidTopic
                | C::MessageSizeTooLarge
                | C::InvalidRecord
                | C::Fatal
        )
    );
    if permanent {
        DeliveryError::Permanent(format!(
            "{e}; check kafka.dead_letter_topic and the producer's permissions"
        ))
    } else {
        DeliveryError::Transient(e.to_string())
    }
}

/// Consumer errors after which the worker cannot go on (it must not spin on them).
pub fn consumer_error_is_fatal(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::TopicAuthorizationFailed
                | C::GroupAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Fatal
        )
    )
}

/// Dead letters to a Kafka topic: the original key and value, and headers with the reason.
pub struct KafkaDeadLetters {
    pub producer: FutureProducer,
    pub topic: String,
}

impl DeadLetters for KafkaDeadLetters {
    fn send<'a>(
        &'a self,
        origin: &'a Origin,
        rejection: &'a Rejection,
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        Box::pin(async move {
            let (topic, partition, offset) = origin.describe();
            let (partition, offset) = (partition.to_string(), offset.to_string());
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: H_REASON,
                    value: Some(rejection.reason),
                })
                .insert(Header {
                    key: H_ERROR,
                    value: Some(rejection.detail.as_str()),
                })
                .insert(Header {
                    key: H_CLASS,
                    value: Some("permanent"),
                })
                .insert(Header {
                    key: H_TOPIC,
                    value: Some(topic),
                })
                .insert(Header {
                    key: H_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: H_OFFSET,
                    value: Some(offset.as_str()),
                });
            let original_len = value.map_or(0, <[u8]>::len).to_string();
            let headers = match value {
                Some(v) if v.len() > DEAD_LETTER_MAX_VALUE => headers.insert(Header {
                    key: H_TRUNCATED,
                    value: Some(original_len.as_str()),
                }),
                _ => headers,
            };
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(k) = key {
                rec = rec.key(&k[..k.len().min(DEAD_LETTER_MAX_VALUE)]);
            }
            if let Some(v) = value {
                rec = rec.payload(&v[..v.len().min(DEAD_LETTER_MAX_VALUE)]);
            }
            tracing::warn!(reason = rejection.reason, detail = %rejection.detail, topic, partition, offset, "dead-lettered");
            self.producer
                .send(rec, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| delivery_error(e))
        })
    }
}

/// Reads until `stop` turns true, then returns (dropping `input`, which drains the
/// pipeline). A record is registered with the offset tracker only once the pipeline has a
/// slot for it, so a rebalance never waits for a record the reader still holds. When the
/// pipeline is full, the assignment is paused while the consumer keeps serving the group
/// (heartbeats, rebalances).
pub async fn read_loop(
    consumer: Arc<KafkaConsumer>,
    tracker: Tracker,
    cfg: MessageSettings,
    input: mpsc::Sender<Item>,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut held: VecDeque<Item> = VecDeque::new();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let item = if let Some(item) = held.pop_front() {
            item
        } else {
            let msg = tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                m = consumer.recv() => m,
            };
            match msg {
                Ok(m) => to_item(&m, &cfg, &metrics),
                Err(e) if consumer_error_is_fatal(&e) => {
                    return Err(format!(
                        "kafka: {e}; check the credentials and ACLs in kafka.properties"
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        };
        let (permit, paused) = match input.try_reserve() {
            Ok(p) => (p, false),
            Err(mpsc::error::TrySendError::Closed(())) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(())) => {
                // A full pipeline is the normal state under load: wait a moment first
                // (librdkafka's own queue is bounded by queued.max.messages.kbytes), and
                // pause only if it stays full, since every pause/resume restarts fetching.
                if let Ok(r) = tokio::time::timeout(PAUSE_AFTER, input.reserve()).await {
                    match r {
                        Ok(p) => {
                            admit(item, p, &tracker, &metrics);
                            continue;
                        }
                        Err(_) => return Ok(()),
                    }
                }
                // Backpressure: pause fetching and wait for room, still polling.
                if let Ok(a) = consumer.assignment() {
                    let _ = consumer.pause(&a);
                }
                tracing::debug!("pipeline full: assignment paused");
                let permit = loop {
                    tokio::select! {
                        biased;
                        p = input.reserve() => break p,
                        _ = stop.changed() => return Ok(()),
                        m = consumer.recv() => match m {
                            // A partition assigned during the pause is not paused: keep its
                            // record in order and pause it too.
                            Ok(m) => {
                                held.push_back(to_item(&m, &cfg, &metrics));
                                if let Ok(a) = consumer.assignment() {
                                    let _ = consumer.pause(&a);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "kafka consumer error while paused"),
                        },
                    }
                };
                match permit {
                    Ok(p) => (p, true),
                    Err(_) => return Ok(()),
                }
            }
        };
        admit(item, permit, &tracker, &metrics);
        if paused {
            if let Ok(a) = consumer.assignment() {
                let _ = consumer.resume(&a);
            }
            tracing::debug!("assignment resumed");
        }
    }
}

/// Registers the record (now that it has a slot) and sends it; a record of a partition
/// revoked meanwhile is dropped: its next owner reads it from the committed offset.
fn admit(mut item: Item, permit: mpsc::Permit<'_, Item>, tracker: &Tracker, metrics: &Metrics) {
    let Origin::Kafka {
        topic,
        partition,
        offset,
        generation,
    } = &mut item.origin
    else {
        unreachable!("the Kafka source makes Kafka origins");
    };
    let mut t = tracker.lock().expect("tracker lock");
    match t.register_assigned(&(topic.to_string(), *partition), *offset) {
        Some(g) => {
            *generation = g;
            metrics.in_flight.set(t.total_in_flight() as i64);
            drop(t);
            permit.send(item);
        }
        None => {
            tracing::debug!(topic = %topic, partition, offset, "record of a revoked partition dropped")
        }
    }
}

fn to_item<M: Message>(m: &M, cfg: &MessageSettings, metrics: &Metrics) -> Item {
    metrics.consumed.inc();
    if let (Some(samples), Some(ts)) = (
        metrics.consume_samples.lock().expect("samples").as_mut(),
        m.timestamp().to_millis(),
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        samples.push((now - ts).max(0) as f64 / 1000.0);
    }
    let rec = Record {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
        timestamp_ms: m.timestamp().to_millis(),
    };
    let op = match decode(&rec, cfg) {
        Decoded::Upsert { id, text, payload } => Op::Upsert { id, text, payload },
        Decoded::Delete { id } => Op::Delete { id },
        Decoded::Reject(rejection) => Op::Reject { rejection },
    };
    Item {
        origin: Origin::Kafka {
            topic: Arc::from(m.topic()),
            partition: m.partition(),
            offset: m.offset(),
            generation: 0,
        },
        op,
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(Arc::from),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// Sets a librdkafka property to our default unless `kafka.properties` sets it (written
/// with dots or underscores, as the settings allow).
fn default_property(c: &mut ClientConfig, k: &KafkaSettings, name: &str, value: &str) {
    if !k.properties.keys().any(|p| p.replace('_', ".") == name) {
        c.set(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::commit_settles;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    #[test]
    fn only_a_commit_that_leaves_nothing_stored_settles_the_offsets() {
        assert!(commit_settles(&Ok(())));
        assert!(commit_settles(&Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::NoOffset
        ))));
        // Refused mid-rebalance: the stored offsets wait for the next commit.
        assert!(!commit_settles(&Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::RebalanceInProgress
        ))));
        assert!(!commit_settles(&Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::RequestTimedOut
        ))));
    }
}
