//! `streambed backfill`: files (JSON lines, CSV with a header, plain text; `.gz` too) or
//! a directory of them through the same batcher, encoder and store as the stream.
//!
//! Resumable: a checkpoint file records, per input file, how many lines are finished
//! (the contiguous prefix, like a Kafka offset). An interrupted run restarts after that
//! prefix; lines finished beyond it are redone and overwrite their points (ids come from
//! the id field, else from file name + line number).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;

use crate::embed::worker::EncoderHandle;
use crate::ids;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::pipeline::{self, Completion, DeadLetters, DeliveryError, Item, Op, Origin};
use crate::run::{load_model, open_sink, pipeline_config, serve_metrics};
use crate::settings::{MessageFormat, MessageSettings, Settings};
use crate::source::decode::{decode, Decoded, Record, Rejection};
use crate::util::blocking_here;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    JsonLines,
    Csv,
    /// Tab-separated, with a header row: read as CSV with a tab.
    Tsv,
    Text,
}

fn kind_of(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_string_lossy().to_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    match Path::new(name).extension()?.to_str()? {
        "jsonl" | "ndjson" | "json" => Some(Kind::JsonLines),
        "csv" => Some(Kind::Csv),
        "tsv" => Some(Kind::Tsv),
        "txt" | "text" => Some(Kind::Text),
        _ => None,
    }
}

/// The files to read, sorted, recursing into directories.
pub fn list_inputs(input: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if input.is_file() {
        kind_of(input).with_context(|| {
            format!(
                "{}: use .jsonl, .csv, .tsv or .txt (optionally .gz)",
                input.display()
            )
        })?;
        return Ok(vec![input.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![input.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if kind_of(&p).is_some() {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn open(path: &Path) -> anyhow::Result<Box<dyn Read + Send>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(f)))
    } else {
        Ok(Box::new(f))
    }
}

/// Finished-line counts per file, written atomically.
#[derive(Default)]
struct Checkpoint {
    path: PathBuf,
    done: BTreeMap<String, u64>,
    dirty: bool,
}

impl Checkpoint {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let done = if path.exists() {
            serde_json::from_str(&std::fs::read_to_string(path)?).with_context(|| {
                format!(
                    "checkpoint {} is not valid; delete it to start over",
                    path.display()
                )
            })?
        } else {
            BTreeMap::new()
        };
        Ok(Self {
            path: path.to_path_buf(),
            done,
            dirty: false,
        })
    }

    fn save(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&self.done)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.dirty = false;
        Ok(())
    }
}

struct FileCompletion {
    /// Lines finished (written or dead-lettered) in this run.
    finished: std::sync::atomic::AtomicU64,
    tracker: Mutex<OffsetTracker>,
    checkpoint: Mutex<Checkpoint>,
    last_save: Mutex<Instant>,
    progress: indicatif::ProgressBar,
}

impl Completion for FileCompletion {
    fn done(&self, origins: &[Origin]) {
        let mut t = self.tracker.lock().expect("tracker");
        let mut c = self.checkpoint.lock().expect("checkpoint");
        for o in origins {
            if let Origin::File { file, line } = o {
                let tp = (file.to_string(), 0);
                let generation = t.generation(&tp).unwrap_or_default();
                if let Some(next) = t.complete(&tp, generation, *line as i64) {
                    c.done.insert(file.to_string(), next as u64);
                    c.dirty = true;
                }
            }
        }
        self.progress.inc(origins.len() as u64);
        self.finished
            .fetch_add(origins.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut last = self.last_save.lock().expect("last save");
        if last.elapsed() > Duration::from_millis(500) {
            // An fsync'd write: off the async workers, in order (the writer waits for it).
            if let Err(e) = blocking_here(|| c.save()) {
                tracing::warn!(error = %e, "could not save the checkpoint");
            }
            *last = Instant::now();
        }
    }
}

/// Dead letters of a backfill: one JSON line each, synced before it counts as delivered.
struct FileDeadLetters {
    file: Mutex<std::fs::File>,
}

impl DeadLetters for FileDeadLetters {
    fn send<'a>(
        &'a self,
        origin: &'a Origin,
        rejection: &'a Rejection,
        _key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<(), DeliveryError>> {
        let (file, _, line) = origin.describe();
        let rec = serde_json::json!({
            "file": file,
            "line": line,
            "reason": rejection.reason,
            "error": rejection.detail,
            "value": value.map(|v| String::from_utf8_lossy(v).into_owned()),
        });
        // An fsync'd append: off the async workers.
        let r = blocking_here(|| -> std::io::Result<()> {
            let mut f = self.file.lock().expect("dead letter file");
            writeln!(f, "{rec}")?;
            f.sync_data()
        })
        .map_err(|e| DeliveryError::Permanent(format!("writing the dead-letter file failed: {e}")));
        Box::pin(async move { r })
    }
}

/// Turns a line into an item: the stream's decoder, with file and line in place of
/// topic, partition and offset.
fn line_item(file: &Arc<str>, line: u64, raw: Vec<u8>, kind: Kind, cfg: &MessageSettings) -> Item {
    let cfg_for_kind;
    let cfg = match kind {
        Kind::Text => {
            cfg_for_kind = MessageSettings {
                format: MessageFormat::Text,
                ..cfg.clone()
            };
            &cfg_for_kind
        }
        // JSON lines may hold Debezium change events (a topic dumped to files).
        Kind::JsonLines if cfg.format == MessageFormat::Debezium => cfg,
        Kind::JsonLines | Kind::Csv | Kind::Tsv => {
            cfg_for_kind = MessageSettings {
                format: MessageFormat::Json,
                ..cfg.clone()
            };
            &cfg_for_kind
        }
    };
    let rec = Record {
        topic: file,
        partition: -1,
        offset: line as i64,
        key: None,
        payload: Some(&raw),
        timestamp_ms: None,
    };
    let op = match decode(&rec, cfg) {
        Decoded::Upsert {
            mut id,
            text,
            mut payload,
        } => {
            if id == ids::from_position(file, -1, line as i64) {
                id = ids::from_file_line(file, line);
            }
            for k in ["topic", "partition", "offset"] {
                payload.remove(k);
            }
            payload.insert("file".into(), Value::String(file.to_string()));
            payload.insert("line".into(), line.into());
            Op::Upsert { id, text, payload }
        }
        Decoded::Delete { id } => Op::Delete { id },
        Decoded::Reject(rejection) => Op::Reject { rejection },
    };
    Item {
        origin: Origin::File {
            file: file.clone(),
            line,
        },
        op,
        key: None,
        value: Some(raw.into()),
        timestamp_ms: None,
    }
}

/// Reads one file from line `skip` on and sends its items; stops early when `stop` is set.
async fn feed_file(
    path: &Path,
    skip: u64,
    cfg: &MessageSettings,
    input: &tokio::sync::mpsc::Sender<Item>,
    completion: &FileCompletion,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let kind = kind_of(path).expect("listed files have a kind");
    let name: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
    let reader = open(path)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(256);
    // Reading and decompressing are blocking; they run on their own thread.
    let reading = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        if matches!(kind, Kind::Csv | Kind::Tsv) {
            let mut r = csv::ReaderBuilder::new()
                .delimiter(if kind == Kind::Tsv { b'\t' } else { b',' })
                .from_reader(reader);
            let headers = r.headers()?.clone();
            for (n, rec) in r.records().enumerate() {
                let line = n as u64;
                let raw = match rec {
                    Ok(rec) => {
                        let obj: serde_json::Map<String, Value> = headers
                            .iter()
                            .zip(rec.iter())
                            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
                            .collect();
                        serde_json::to_vec(&obj)?
                    }
                    Err(e) => format!("<unreadable CSV record: {e}>").into_bytes(),
                };
                if line >= skip && tx.blocking_send((line, raw)).is_err() {
                    break;
                }
            }
        } else {
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            let mut line = 0u64;
            loop {
                buf.clear();
                if r.read_until(b'\n', &mut buf)? == 0 {
                    break;
                }
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                if line >= skip && tx.blocking_send((line, std::mem::take(&mut buf))).is_err() {
                    break;
                }
                line += 1;
            }
        }
        Ok(())
    });
    while let Some((line, raw)) = rx.recv().await {
        if *stop.borrow() {
            return Ok(false);
        }
        completion
            .tracker
            .lock()
            .expect("tracker")
            .register(&(name.to_string(), 0), line as i64);
        if input
            .send(line_item(&name, line, raw, kind, cfg))
            .await
            .is_err()
        {
            return Ok(false);
        }
    }
    reading.await??;
    Ok(true)
}

/// Figures of a backfill run.
#[derive(Debug)]
pub struct Summary {
    pub files: usize,
    pub lines: u64,
    pub seconds: f64,
    pub complete: bool,
    /// Documents written, the chunks (points) they made, texts embedded, and documents
    /// skipped because the store held the same content.
    pub documents: u64,
    pub chunks: u64,
    pub embedded: u64,
    pub unchanged: u64,
}

pub async fn backfill(
    s: Settings,
    input: &Path,
    checkpoint: &Path,
    dead_letter: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let files = list_inputs(input)?;
    anyhow::ensure!(
        !files.is_empty(),
        "{}: no .jsonl, .csv, .tsv or .txt files found",
        input.display()
    );
    let n_files = files.len();
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    // A long backfill is watched like the worker: /metrics, /healthz, /readyz.
    serve_metrics(&s, &metrics, None, stop_rx.clone()).await?;
    let model = load_model(&s, &metrics, &s.model.prefix).await?;
    let documents = crate::run::documents(&s, &model)?;
    let sink = open_sink(&s, model.info.dim, &mut stop_rx.clone()).await?;
    // The input files are the source: ready once the store is open.
    metrics
        .ready
        .source_ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    metrics
        .ready
        .sink_reachable
        .store(true, std::sync::atomic::Ordering::Relaxed);
    crate::run::watch_sink(sink.clone(), metrics.clone(), stop_rx.clone());
    let cp = Checkpoint::load(checkpoint)?;
    let any_gz = files
        .iter()
        .any(|f| f.extension().is_some_and(|e| e == "gz"));
    let total: u64 = files
        .iter()
        .filter(|f| f.extension().is_none_or(|e| e != "gz"))
        .map(|f| {
            count_lines(f).saturating_sub(
                cp.done
                    .get(f.to_string_lossy().as_ref())
                    .copied()
                    .unwrap_or(0),
            )
        })
        .sum();
    // Compressed files are not counted up front (that would read them twice): with any,
    // the bar shows a count instead of a total.
    let progress = if any_gz {
        let p = indicatif::ProgressBar::new_spinner();
        p.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos} lines  {per_sec}")
                .expect("template"),
        );
        p
    } else {
        let p = indicatif::ProgressBar::new(total);
        p.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} lines  {per_sec}  eta {eta}",
            )
            .expect("template"),
        );
        p
    };
    let skips: Vec<u64> = files
        .iter()
        .map(|f| {
            cp.done
                .get(f.to_string_lossy().as_ref())
                .copied()
                .unwrap_or(0)
        })
        .collect();
    let completion = Arc::new(FileCompletion {
        finished: Default::default(),
        tracker: Mutex::new(OffsetTracker::new()),
        checkpoint: Mutex::new(cp),
        last_save: Mutex::new(Instant::now()),
        progress: progress.clone(),
    });
    let dead = Arc::new(FileDeadLetters {
        file: Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dead_letter)
                .with_context(|| format!("opening {}", dead_letter.display()))?,
        ),
    });
    let pipe = pipeline::start(
        pipeline_config(&s),
        documents,
        EncoderHandle::spawn_with_threads(model.encoder, 2, s.model.compute_threads()),
        sink,
        dead,
        completion.clone(),
        metrics.clone(),
    );
    let feed = {
        let completion = completion.clone();
        let cfg = s.message.clone();
        let stop = stop_rx.clone();
        let input = pipe.input;
        async move {
            for (f, skip) in files.iter().zip(skips) {
                if !feed_file(f, skip, &cfg, &input, &completion, &stop).await? {
                    return Ok::<bool, anyhow::Error>(false);
                }
            }
            Ok(true)
        }
    };
    tokio::pin!(feed);
    tokio::pin!(shutdown);
    let mut finished = pipe.finished;
    let mut pipeline_result = None;
    let mut interrupted = false;
    let fed = tokio::select! {
        r = &mut feed => r?,
        _ = &mut shutdown => { interrupted = true; false }
        r = &mut finished => { pipeline_result = Some(r); false }
    };
    // The input was read to its end: the work in flight is finished, however long it takes
    // (the shutdown deadline is for shutdowns). An interruption, now or during this wait,
    // gets `shutdown.deadline_ms` to drain.
    let deadline = Duration::from_millis(s.shutdown.deadline_ms);
    if pipeline_result.is_none() && !interrupted {
        tokio::select! {
            r = &mut finished => pipeline_result = Some(r),
            _ = &mut shutdown => interrupted = true,
        }
    }
    if interrupted {
        let _ = stop_tx.send(true);
        if pipeline_result.is_none() {
            pipeline_result = tokio::time::timeout(deadline, &mut finished).await.ok();
        }
    }
    let drained = pipeline_result.is_some();
    let failure = match pipeline_result {
        Some(Ok(Err(e))) => Some(anyhow::anyhow!(e)),
        Some(Err(e)) => Some(anyhow::anyhow!("the pipeline panicked: {e}")),
        _ => None,
    };
    {
        let mut cp = completion.checkpoint.lock().expect("checkpoint");
        cp.dirty = true;
        blocking_here(|| cp.save()).context("saving the checkpoint")?;
    }
    progress.finish_and_clear();
    if let Some(e) = failure {
        return Err(
            e.context("backfill stopped; the checkpoint holds what was finished, rerun to resume")
        );
    }
    let complete = fed && drained && !interrupted;
    Ok(Summary {
        files: n_files,
        lines: completion
            .finished
            .load(std::sync::atomic::Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
        complete,
        documents: metrics.documents.get(),
        chunks: metrics.upserted.get(),
        embedded: metrics.embedded.get(),
        unchanged: metrics.unchanged.get(),
    })
}

/// Lines in a file, read in fixed-size chunks (a corpus may not fit in memory); 0 when
/// unreadable (the read itself reports the error later).
fn count_lines(path: &Path) -> u64 {
    let Ok(f) = std::fs::File::open(path) else {
        return 0;
    };
    let mut r = BufReader::with_capacity(1 << 16, f);
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let buf = match r.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(b) => b,
        };
        lines += buf.iter().filter(|&&c| c == b'\n').count() as u64;
        last = *buf.last().expect("non-empty");
        let n = buf.len();
        r.consume(n);
    }
    lines + u64::from(last != b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        let body = "한국어 문장\n".repeat(20_000); // > 64 KiB: several chunks
        std::fs::write(&p, &body).unwrap();
        assert_eq!(count_lines(&p), 20_000);
        std::fs::write(&p, format!("{body}마지막 줄")).unwrap();
        assert_eq!(
            count_lines(&p),
            20_001,
            "a last line without newline counts"
        );
        std::fs::write(&p, "").unwrap();
        assert_eq!(count_lines(&p), 0);
    }

    #[test]
    fn file_kinds() {
        assert_eq!(kind_of(Path::new("a/b.jsonl")), Some(Kind::JsonLines));
        assert_eq!(kind_of(Path::new("b.CSV.gz")), Some(Kind::Csv));
        assert_eq!(kind_of(Path::new("c.txt")), Some(Kind::Text));
        assert_eq!(kind_of(Path::new("e.tsv.gz")), Some(Kind::Tsv));
        assert_eq!(kind_of(Path::new("d.parquet")), None);
    }

    #[test]
    fn lines_get_file_ids_and_payload() {
        let cfg = MessageSettings::default();
        let f: Arc<str> = Arc::from("corpus.txt");
        let item = line_item(&f, 3, "한국어 문장".as_bytes().to_vec(), Kind::Text, &cfg);
        let Op::Upsert { id, payload, .. } = item.op else {
            panic!()
        };
        assert_eq!(id, ids::from_file_line("corpus.txt", 3));
        assert_eq!(payload["line"], 3);
        assert!(!payload.contains_key("topic"));
        let item = line_item(
            &f,
            4,
            br#"{"id": "a", "text": "x"}"#.to_vec(),
            Kind::JsonLines,
            &cfg,
        );
        let Op::Upsert { id, .. } = item.op else {
            panic!()
        };
        assert_eq!(id, ids::from_entity(b"a"));
    }
}
