//! The encoder commands: `embed`, `eval`, `bench`, and the model-folder tools.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::embed::{self, DeviceKind, Encoder, EncoderOptions, F32Matmul, LoadedModel, Precision};
use crate::sts;
use crate::util::{peak_rss_mb, quantile};

/// Which model to run and how; shared by every command that embeds.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model folder (Hugging Face layout) or hub id such as klue/bert-base.
    #[arg(long, env = "STREAMBED_MODEL")]
    pub model: String,
    /// Text put before every input (e5 models want "query: " or "passage: ").
    #[arg(long, default_value = "")]
    pub prefix: String,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// f32 matmul precision on CPU: "high" splits each f32 into two bf16 on AMX-BF16
    /// processors (three tile products, f32 sums), "highest" keeps f32 products,
    /// "medium" one bf16 product on AMX-BF16 (faster, bf16's precision).
    #[arg(long, value_enum, default_value = "high")]
    pub f32_matmul: F32MatmulArg,
    /// Inputs per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum F32MatmulArg {
    High,
    Highest,
    Medium,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
    Int8,
}

impl ModelArgs {
    pub fn options(&self) -> EncoderOptions {
        EncoderOptions {
            device: match self.device {
                DeviceArg::Cpu => DeviceKind::Cpu,
                DeviceArg::Cuda => DeviceKind::Cuda,
            },
            precision: match self.dtype {
                DtypeArg::F32 => Precision::F32,
                DtypeArg::F16 => Precision::F16,
                DtypeArg::Bf16 => Precision::Bf16,
                DtypeArg::Int8 => Precision::Int8,
            },
            f32_matmul: match self.f32_matmul {
                F32MatmulArg::High => F32Matmul::High,
                F32MatmulArg::Highest => F32Matmul::Highest,
                F32MatmulArg::Medium => F32Matmul::Medium,
            },
            max_batch: self.batch_size,
        }
    }

    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let m = embed::load_model(&self.model, &self.prefix, &self.options())?;
        tracing::info!(
            model = %m.info.name,
            dim = m.info.dim,
            pooling = m.info.pooling.as_str(),
            normalize = m.info.normalize,
            max_seq_length = m.info.max_seq_length,
            "model loaded"
        );
        Ok(m)
    }
}

/// Pulls the text out of one stdin line: a JSON object with a string `text` field, or the
/// line itself.
fn line_text(line: &str) -> Result<String, String> {
    if line.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        return match v.get("text") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err("field \"text\" is not a string".into()),
            None => Err("JSON line has no \"text\" field".into()),
        };
    }
    Ok(line.to_string())
}

/// `streambed embed`: one JSON line out per line in.
pub fn embed_stdin(args: &ModelArgs) -> anyhow::Result<()> {
    let m = args.load()?;
    let stdin = std::io::stdin();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut lines = stdin.lock().lines();
    let mut index = 0usize;
    loop {
        let mut chunk = Vec::with_capacity(args.batch_size);
        for line in lines.by_ref().take(args.batch_size) {
            chunk.push(line.context("reading stdin")?);
        }
        if chunk.is_empty() {
            break;
        }
        let prepared: Vec<Result<embed::Tokens, String>> = chunk
            .iter()
            .map(|l| line_text(l).and_then(|t| m.tokenizer.tokenize(&t).map_err(|e| e.to_string())))
            .collect();
        let ok: Vec<&[u32]> = prepared
            .iter()
            .filter_map(|p| p.as_ref().ok().map(|t| t.ids.as_slice()))
            .collect();
        let mut vectors = m.encoder.embed(&ok)?.into_iter();
        for p in prepared {
            let line = match p {
                Ok(t) => serde_json::json!({
                    "index": index,
                    "tokens": t.ids.len(),
                    "truncated": t.truncated,
                    "vector": vectors.next().expect("one vector per ok input"),
                }),
                Err(e) => serde_json::json!({"index": index, "error": e}),
            };
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
            index += 1;
        }
    }
    out.flush()?;
    Ok(())
}

/// Embeds every text (batched, tokenizer errors are fatal here: evaluation data is clean).
fn embed_all(m: &LoadedModel, texts: &[String], batch: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(batch * 8) {
        let toks = chunk
            .iter()
            .map(|t| m.tokenizer.tokenize(t).map(|t| t.ids))
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
        out.extend(m.encoder.embed(&refs)?);
    }
    Ok(out)
}

/// Result of an STS evaluation.
#[derive(Debug, Clone, Copy)]
pub struct EvalResult {
    pub spearman: f64,
    pub pearson: f64,
    pub pairs: usize,
}

pub fn evaluate(m: &LoadedModel, pairs: &[sts::Pair], batch: usize) -> anyhow::Result<EvalResult> {
    let a: Vec<String> = pairs.iter().map(|p| p.a.clone()).collect();
    let b: Vec<String> = pairs.iter().map(|p| p.b.clone()).collect();
    let va = embed_all(m, &a, batch)?;
    let vb = embed_all(m, &b, batch)?;
    let cos: Vec<f64> = va
        .iter()
        .zip(&vb)
        .map(|(x, y)| embed::cosine(x, y) as f64)
        .collect();
    let gold: Vec<f64> = pairs.iter().map(|p| p.score).collect();
    Ok(EvalResult {
        spearman: sts::spearman(&cos, &gold),
        pearson: sts::pearson(&cos, &gold),
        pairs: pairs.len(),
    })
}

/// `streambed eval`.
pub fn eval(args: &ModelArgs, data: &std::path::Path) -> anyhow::Result<()> {
    let m = args.load()?;
    let pairs = sts::load_pairs(data)?;
    let r = evaluate(&m, &pairs, args.batch_size)?;
    println!(
        "spearman={:.4} pearson={:.4} pairs={}",
        r.spearman, r.pearson, r.pairs
    );
    Ok(())
}

/// Reads benchmark sentences: an STS file (its distinct sentences) or plain text lines.
pub fn read_sentences(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let is_sts = path.extension().is_some_and(|e| e == "json" || e == "tsv");
    if is_sts {
        return Ok(sts::sentences(&sts::load_pairs(path)?));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect())
}

/// Figures printed by `streambed bench`.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub sentences: usize,
    pub tokens: usize,
    pub sent_per_s: f64,
    pub tok_per_s: f64,
    pub p50_batch_ms: f64,
    pub p99_batch_ms: f64,
    pub tokenize_s: f64,
    pub peak_rss_mb: f64,
}

impl BenchResult {
    /// Figures from `sentences` embedded in `total_s` seconds, with one time per batch (ms).
    fn new(
        sentences: usize,
        tokens: usize,
        total_s: f64,
        mut batch_ms: Vec<f64>,
        tokenize_s: f64,
    ) -> Self {
        batch_ms.sort_by(f64::total_cmp);
        Self {
            sentences,
            tokens,
            sent_per_s: sentences as f64 / total_s,
            tok_per_s: tokens as f64 / total_s,
            p50_batch_ms: quantile(&batch_ms, 0.5),
            p99_batch_ms: quantile(&batch_ms, 0.99),
            tokenize_s,
            peak_rss_mb: peak_rss_mb(),
        }
    }
}

/// Encoder-only throughput: tokenisation is timed separately, then batches of
/// `batch_size` sentences are embedded and timed. With `sorted` the whole input is sorted
/// by length first, as sentence-transformers' `encode` does (the like-for-like
/// comparison); without, batches keep input order, as a stream delivers them. The first
/// batch is a warm-up and is not counted.
pub fn bench_encoder(
    m: &LoadedModel,
    sentences: &[String],
    batch: usize,
    sorted: bool,
) -> anyhow::Result<BenchResult> {
    let t0 = Instant::now();
    let mut toks = sentences
        .iter()
        .map(|s| m.tokenizer.tokenize(s).map(|t| t.ids))
        .collect::<Result<Vec<_>, _>>()?;
    let tokenize_s = t0.elapsed().as_secs_f64();
    if sorted {
        toks.sort_by_key(Vec::len);
    }
    let batches: Vec<Vec<&[u32]>> = toks
        .chunks(batch)
        .map(|c| c.iter().map(Vec::as_slice).collect())
        .collect();
    if let Some(first) = batches.first() {
        m.encoder.embed(first)?;
    }
    let mut times = Vec::with_capacity(batches.len());
    let started = Instant::now();
    for b in &batches {
        let t = Instant::now();
        m.encoder.embed(b)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let tokens: usize = toks.iter().map(Vec::len).sum();
    Ok(BenchResult::new(
        sentences.len(),
        tokens,
        started.elapsed().as_secs_f64(),
        times,
        tokenize_s,
    ))
}

/// Text to vectors with tokenisation overlapped: `threads` tokenizer threads prepare
/// batches (in order of character length, as sentence-transformers' `encode` sorts) while
/// the model runs, so the device never waits for the tokenizer unless the tokenizer is the
/// bottleneck. With several `encoders` (model copies, each on its own GPU stream), batches
/// go to whichever is free. Timed from raw text to vectors in host memory, tokenisation
/// included: the like-for-like figure against `SentenceTransformer.encode`.
pub fn bench_pipelined(
    tokenizer: &embed::TextTokenizer,
    encoders: &[&embed::BertEncoder],
    sentences: &[String],
    batch: usize,
    threads: usize,
) -> anyhow::Result<BenchResult> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    let mut order: Vec<usize> = (0..sentences.len()).collect();
    order.sort_by_key(|&i| sentences[i].chars().count());
    let chunks: Vec<&[usize]> = order.chunks(batch).collect();
    let tokenize = |chunk: &[usize]| -> anyhow::Result<Vec<Vec<u32>>> {
        Ok(chunk
            .iter()
            .map(|&i| tokenizer.tokenize(&sentences[i]).map(|t| t.ids))
            .collect::<Result<Vec<_>, _>>()?)
    };
    // Warm-up on the first batch, on every copy (device kernels compile on first use).
    if let Some(first) = chunks.first() {
        let toks = tokenize(first)?;
        let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
        for e in encoders {
            e.embed(&refs)?;
        }
    }
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let (tx, rx) =
        std::sync::mpsc::sync_channel::<anyhow::Result<Vec<Vec<u32>>>>(threads.max(1) * 2);
    let rx = Mutex::new(rx);
    let times = Mutex::new(Vec::with_capacity(chunks.len()));
    let tokens = AtomicUsize::new(0);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for _ in 0..threads.max(1) {
            let tx = tx.clone();
            let (next, chunks, tokenize) = (&next, &chunks, &tokenize);
            scope.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = chunks.get(k) else { break };
                if tx.send(tokenize(chunk)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let workers: Vec<_> = encoders
            .iter()
            .map(|e| {
                let (rx, times, tokens) = (&rx, &times, &tokens);
                scope.spawn(move || -> anyhow::Result<()> {
                    loop {
                        let job = rx.lock().expect("queue").recv();
                        let Ok(toks) = job else { return Ok(()) };
                        let toks = toks?;
                        let refs: Vec<&[u32]> = toks.iter().map(Vec::as_slice).collect();
                        tokens.fetch_add(refs.iter().map(|r| r.len()).sum(), Ordering::Relaxed);
                        let t = Instant::now();
                        e.embed(&refs)?;
                        times
                            .lock()
                            .expect("times")
                            .push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("encoder thread")?;
        }
        Ok(())
    })?;
    Ok(BenchResult::new(
        sentences.len(),
        tokens.into_inner(),
        started.elapsed().as_secs_f64(),
        times.into_inner().expect("times"),
        0.0,
    ))
}

/// Which measurement `streambed bench` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchOrder {
    /// Pre-tokenised, whole input sorted by token count: the model alone.
    LengthSorted,
    /// Pre-tokenised, batches in input order, as a stream delivers them.
    Stream,
    /// Text to vectors, tokenisation on other threads overlapped with the model.
    Pipelined,
}

/// `streambed bench`.
pub fn bench(
    args: &ModelArgs,
    input: &std::path::Path,
    limit: Option<usize>,
    repeat_to: Option<usize>,
    orders: &[BenchOrder],
    tokenizer_threads: usize,
    streams: usize,
) -> anyhow::Result<()> {
    let m = args.load()?;
    // More model copies for the pipelined measurement (GPU streams side by side).
    let extra: Vec<LoadedModel> = if orders.contains(&BenchOrder::Pipelined) {
        (1..streams.max(1))
            .map(|_| args.load())
            .collect::<anyhow::Result<_>>()?
    } else {
        Vec::new()
    };
    let encoders: Vec<&embed::BertEncoder> = std::iter::once(&m.encoder)
        .chain(extra.iter().map(|x| &x.encoder))
        .collect();
    let mut sentences = read_sentences(input)?;
    if let Some(n) = limit {
        sentences.truncate(n);
    }
    if let Some(n) = repeat_to {
        anyhow::ensure!(
            !sentences.is_empty(),
            "{} has no sentences",
            input.display()
        );
        sentences = sentences.iter().cycle().take(n).cloned().collect();
    }
    for &order in orders {
        let r = match order {
            BenchOrder::LengthSorted => bench_encoder(&m, &sentences, args.batch_size, true)?,
            BenchOrder::Stream => bench_encoder(&m, &sentences, args.batch_size, false)?,
            BenchOrder::Pipelined => bench_pipelined(
                &m.tokenizer,
                &encoders,
                &sentences,
                args.batch_size,
                tokenizer_threads,
            )?,
        };
        let name = clap::ValueEnum::to_possible_value(&order)
            .expect("named")
            .get_name()
            .to_string();
        println!(
            "order={name} sent_per_s={:.1} tok_per_s={:.0} p50_batch_ms={:.1} p99_batch_ms={:.1} peak_rss_mb={:.0} sentences={} tokens={} batch_size={} device={} dtype={} kernel={} streams={} threads={} tokenize_s={:.2}",
            r.sent_per_s,
            r.tok_per_s,
            r.p50_batch_ms,
            r.p99_batch_ms,
            r.peak_rss_mb,
            r.sentences,
            r.tokens,
            args.batch_size,
            m.info.device.as_str(),
            m.info.precision.as_str(),
            embed::cpu_kernel(&args.options()),
            encoders.len(),
            candle_core::utils::get_num_threads(),
            r.tokenize_s,
        );
    }
    Ok(())
}

/// `streambed search`: embeds the query (with `model.query_prefix`) and prints the nearest
/// points as JSON lines.
pub async fn search(
    s: crate::settings::Settings,
    query: &str,
    top_k: usize,
    group_by_document: bool,
    mode: Option<crate::settings::SearchMode>,
) -> anyhow::Result<()> {
    use crate::sink::Sink;
    let metrics = crate::metrics::Metrics::new();
    let model = crate::run::load_model(&s, &metrics, &s.model.query_prefix).await?;
    let searcher =
        crate::search::Searcher::new(&s, &model.tokenizer).map_err(|e| anyhow::anyhow!(e))?;
    let mode = searcher
        .mode(mode)
        .map_err(|e| anyhow::anyhow!("--mode: {e}"))?;
    let vector = if crate::search::Searcher::needs_dense(mode) {
        let tokens = model.tokenizer.tokenize(query)?;
        model.encoder.embed(&[tokens.ids.as_slice()])?.pop()
    } else {
        None
    };
    let q = searcher.query(mode, query, vector, top_k);
    let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let sink = crate::run::open_sink(&s, model.info.dim, &mut stop).await?;
    let hits = if group_by_document {
        crate::sink::search_documents(sink.as_ref(), q, top_k, None).await?
    } else {
        sink.search(q, top_k, None).await?
    };
    for hit in hits {
        let document = crate::sink::document_of(&hit);
        println!(
            "{}",
            serde_json::json!({"score": hit.score, "id": hit.id, "document_id": document, "text": hit.payload.get("text"), "payload": hit.payload})
        );
    }
    Ok(())
}

/// `streambed produce`: sends the lines of a file to a topic (creating it with
/// `partitions` partitions when missing). JSON lines are keyed by their `id` field when
/// they have one. For demos, tests and feeding a corpus through the stream path.
pub async fn produce(
    brokers: &str,
    topic: &str,
    partitions: i32,
    input: &std::path::Path,
) -> anyhow::Result<usize> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;

    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = cfg.create()?;
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10))),
        )
        .await?;
    for r in created {
        if let Err((t, e)) = r {
            if e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                anyhow::bail!("creating topic {t}: {e}");
            }
        }
    }
    let producer: FutureProducer = cfg
        .clone()
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let mut pending = futures::stream::FuturesOrdered::new();
    let mut sent = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let key = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| match v.get("id") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            });
        let line = line.to_string();
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push_back(async move {
            let mut rec = FutureRecord::<String, String>::to(&topic).payload(&line);
            if let Some(k) = &key {
                rec = rec.key(k);
            }
            producer
                .send(rec, std::time::Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
        });
        if pending.len() >= 1000 {
            use futures::StreamExt;
            pending.next().await.expect("pending")?;
        }
        sent += 1;
    }
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(sent)
}

/// Figures of `streambed eval --documents`.
#[derive(Debug, Clone)]
pub struct DocumentEval {
    pub documents: usize,
    pub queries: usize,
    /// Chunks the split documents made.
    pub chunks: usize,
    pub hit5_split: f64,
    pub hit5_truncate: f64,
    pub mrr10_split: f64,
    pub mrr10_truncate: f64,
}

/// Retrieval over long documents, `split` against `truncate`: documents of `per_doc`
/// STS sentences, of which every tenth is one side of a pair with gold >= 4; the other
/// side is a query, kept only when its sentence starts past the model's first
/// `max_seq_length` tokens of the document (what truncation cannot see). A document
/// scores by its best chunk (`search --group-by-document`); hit@5 and MRR@10 over
/// documents. Deterministic: the corpus is shuffled with a fixed seed.
pub fn eval_documents(
    args: &ModelArgs,
    data: &std::path::Path,
    query_prefix: &str,
    n_docs: usize,
    per_doc: usize,
    max_tokens: usize,
) -> anyhow::Result<DocumentEval> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    use crate::settings::{ChunkMode, ChunkSettings};

    let m = args.load()?;
    let limit = m.info.max_seq_length;
    let dir = embed::hub::resolve(&args.model)?;
    let queries_tok = embed::TextTokenizer::load(&dir, limit, query_prefix)?;
    let pairs = sts::load_pairs(data)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut relevant: Vec<&sts::Pair> = pairs
        .iter()
        .filter(|p| p.score >= 4.0 && p.a != p.b)
        .collect();
    let used: std::collections::HashSet<&str> = pairs
        .iter()
        .filter(|p| p.score >= 4.0)
        .flat_map(|p| [p.a.as_str(), p.b.as_str()])
        .collect();
    let mut fillers: Vec<String> = sts::sentences(&pairs)
        .into_iter()
        .filter(|s| !used.contains(s.as_str()))
        .collect();
    relevant.shuffle(&mut rng);
    fillers.shuffle(&mut rng);
    let per_relevant = 10;
    anyhow::ensure!(
        relevant.len() >= n_docs * per_doc / per_relevant && fillers.len() >= n_docs * per_doc,
        "{}: too few sentences for {n_docs} documents of {per_doc}",
        data.display()
    );
    let (mut rel, mut fill) = (relevant.into_iter(), fillers.into_iter());
    let mut docs = Vec::new();
    let mut queries: Vec<(String, usize)> = Vec::new();
    for d in 0..n_docs {
        let mut text = String::new();
        for j in 0..per_doc {
            if !text.is_empty() {
                text.push(' ');
            }
            if j % per_relevant == per_relevant / 2 {
                let p = rel.next().expect("checked");
                if m.tokenizer.count_whole(&text) > limit {
                    queries.push((p.b.clone(), d));
                }
                text.push_str(&p.a);
            } else {
                text.push_str(&fill.next().expect("checked"));
            }
        }
        docs.push(text);
    }
    anyhow::ensure!(
        !queries.is_empty(),
        "no sentence lies past the first {limit} tokens; use longer documents"
    );

    let embed = |seqs: Vec<Vec<u32>>| -> anyhow::Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(seqs.len());
        for part in seqs.chunks(args.batch_size * 8) {
            let refs: Vec<&[u32]> = part.iter().map(Vec::as_slice).collect();
            out.extend(m.encoder.embed(&refs)?);
        }
        Ok(out)
    };
    let q_vecs = embed(
        queries
            .iter()
            .map(|(q, _)| queries_tok.tokenize(q).map(|t| t.ids))
            .collect::<Result<_, _>>()?,
    )?;
    let mut figures = [(0.0, 0.0, 0usize); 2];
    for (k, mode) in [ChunkMode::Split, ChunkMode::Truncate]
        .into_iter()
        .enumerate()
    {
        let documents = crate::document::Documents::new(
            m.tokenizer.clone(),
            &ChunkSettings {
                mode,
                max_tokens: if mode == ChunkMode::Split {
                    max_tokens
                } else {
                    0
                },
                overlap_tokens: if max_tokens == 0 || max_tokens >= 256 {
                    32
                } else {
                    max_tokens / 8
                },
                skip_unchanged: false,
            },
            &m.info.name,
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let mut owner = Vec::new();
        let mut seqs = Vec::new();
        for (d, text) in docs.iter().enumerate() {
            match documents.plan(text)? {
                crate::document::Plan::Whole(t) => {
                    owner.push(d);
                    seqs.push(t.ids);
                }
                crate::document::Plan::Chunks(spans) => {
                    for r in spans {
                        owner.push(d);
                        seqs.push(documents.tokenize_chunk(&text[r])?.ids);
                    }
                }
            }
        }
        let chunk_vecs = embed(seqs)?;
        let (mut hits, mut rr) = (0.0, 0.0);
        for (qv, (_, relevant_doc)) in q_vecs.iter().zip(&queries) {
            let mut best = vec![f32::MIN; docs.len()];
            for (cv, &d) in chunk_vecs.iter().zip(&owner) {
                best[d] = best[d].max(embed::cosine(qv, cv));
            }
            let rank = best.iter().filter(|&&s| s > best[*relevant_doc]).count();
            if rank < 5 {
                hits += 1.0;
            }
            if rank < 10 {
                rr += 1.0 / (rank + 1) as f64;
            }
        }
        let n = queries.len() as f64;
        figures[k] = (hits / n, rr / n, chunk_vecs.len());
    }
    Ok(DocumentEval {
        documents: docs.len(),
        queries: queries.len(),
        chunks: figures[0].2,
        hit5_split: figures[0].0,
        hit5_truncate: figures[1].0,
        mrr10_split: figures[0].1,
        mrr10_truncate: figures[1].1,
    })
}
