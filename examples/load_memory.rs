//! Resident memory of a model folder as the worker loads it: after the tokenizer, after
//! the encoder, after a first batch. Linux only (reads /proc/self/status).
//!
//!   cargo run --release --example load_memory -- models/multilingual-e5-small [f32|int8]

use std::path::Path;

use streambed::embed::{BertEncoder, Encoder, EncoderOptions, ModelSpec, Precision, TextTokenizer};

fn status(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn report(stage: &str) {
    println!(
        "{stage:<16} rss_mb={:.0} hwm_mb={:.0}",
        status("VmRSS:"),
        status("VmHWM:")
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: load_memory MODEL_DIR [f32|int8]");
    let precision = match args.next().as_deref() {
        None | Some("f32") => Precision::F32,
        Some("int8") => Precision::Int8,
        Some(other) => panic!("dtype {other}: use f32 or int8"),
    };
    let dir = Path::new(&dir);
    report("start");
    let spec = ModelSpec::read(dir).expect("model folder");
    let tokenizer = TextTokenizer::load(dir, spec.max_seq_length, "").expect("tokenizer");
    report("tokenizer");
    let opts = EncoderOptions {
        precision,
        ..Default::default()
    };
    let encoder = BertEncoder::load(&spec, &opts).expect("weights");
    report("encoder");
    let ids = tokenizer.tokenize("한국어 문장입니다").expect("tokens").ids;
    encoder.embed(&[&ids]).expect("embedding");
    report("first batch");
}
