//! A model folder with the exact klue/bert-base configuration (768 hidden, 12 layers,
//! 12 heads, 3072 intermediate, vocabulary 32000, 512 positions) and seeded random weights.
//! No Korean BERT is installable here; this folder lets us measure the reference model's
//! compute and exercise 768-dimension handling and the `vocab.txt` tokenizer path.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::config::BertConfig;
use super::e5s1::write_sentence_transformers_files;

pub const KLUE_VOCAB: usize = 32000;

/// A WordPiece vocabulary in klue's special-token order: every Hangul syllable as a word
/// start and as a `##` continuation, ASCII, then `[unusedN]` up to 32000 entries.
pub fn klue_like_vocab() -> Vec<String> {
    let mut v: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in (b'!'..=b'~').map(char::from) {
        v.push(c.to_string());
        v.push(format!("##{c}"));
    }
    for cp in 0xAC00u32..=0xD7A3 {
        let c = char::from_u32(cp).expect("hangul syllable");
        v.push(c.to_string());
        v.push(format!("##{c}"));
    }
    let mut i = 0;
    while v.len() < KLUE_VOCAB {
        v.push(format!("[unused{i}]"));
        i += 1;
    }
    v
}

/// Seeded random weights for a BERT of `cfg`'s shape, named as `BertModel` saves them.
/// Weights are uniform in ±0.035 (standard deviation 0.02, BERT's initializer range);
/// layer norms are identity. The same seed gives the same values.
pub fn random_weights(cfg: &BertConfig, seed: u64) -> candle_core::Result<HashMap<String, Tensor>> {
    let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut rand_tensor = |shape: &[usize]| -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.035f32..0.035)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    };
    let ones = |n: usize| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu);
    let zeros = |n: usize| Tensor::zeros(n, candle_core::DType::F32, &Device::Cpu);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "embeddings.word_embeddings.weight".into(),
        rand_tensor(&[cfg.vocab_size, h])?,
    );
    t.insert(
        "embeddings.position_embeddings.weight".into(),
        rand_tensor(&[cfg.max_position_embeddings, h])?,
    );
    t.insert(
        "embeddings.token_type_embeddings.weight".into(),
        rand_tensor(&[cfg.type_vocab_size, h])?,
    );
    t.insert("embeddings.LayerNorm.weight".into(), ones(h)?);
    t.insert("embeddings.LayerNorm.bias".into(), zeros(h)?);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for (name, o, i) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", ff, h),
            ("output.dense", h, ff),
        ] {
            t.insert(format!("{p}.{name}.weight"), rand_tensor(&[o, i])?);
            t.insert(format!("{p}.{name}.bias"), rand_tensor(&[o])?);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            t.insert(format!("{p}.{name}.weight"), ones(h)?);
            t.insert(format!("{p}.{name}.bias"), zeros(h)?);
        }
    }
    Ok(t)
}

/// Writes a copy of the model folder `like` (configuration, tokenizer, sentence-transformers
/// files) with seeded random weights in place of its own. Used to measure a model's compute
/// where its real weights cannot travel (the GPU machine takes at most 64 MiB).
pub fn write_random_like(like: &Path, out: &Path, seed: u64) -> anyhow::Result<()> {
    let cfg_text = std::fs::read_to_string(like.join("config.json"))
        .with_context(|| format!("reading {}", like.join("config.json").display()))?;
    let cfg: BertConfig = serde_json::from_str(&cfg_text)
        .with_context(|| format!("parsing {}", like.join("config.json").display()))?;
    copy_non_weights(like, out)?;
    candle_core::safetensors::save(&random_weights(&cfg, seed)?, out.join("model.safetensors"))?;
    Ok(())
}

fn copy_non_weights(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let is_weights = path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "bin" || e == "pt");
        if entry.file_type()?.is_dir() {
            if !name.to_string_lossy().starts_with('.') {
                copy_non_weights(&path, &to.join(&name))?;
            }
        } else if !is_weights {
            std::fs::copy(&path, to.join(&name))?;
        }
    }
    Ok(())
}

/// Writes the klue/bert-base-shaped folder. The same seed gives the same bytes.
pub fn write_klue_bert_base(out: &Path, seed: u64) -> anyhow::Result<()> {
    let (h, layers, ff, pos, types) = (768usize, 12usize, 3072usize, 512usize, 2usize);
    let cfg = BertConfig {
        vocab_size: KLUE_VOCAB,
        hidden_size: h,
        num_hidden_layers: layers,
        num_attention_heads: 12,
        intermediate_size: ff,
        hidden_act: "gelu".into(),
        max_position_embeddings: pos,
        type_vocab_size: types,
        layer_norm_eps: 1e-12,
        model_type: Some("bert".into()),
        architectures: None,
        position_embedding_type: None,
    };
    let t = random_weights(&cfg, seed)?;
    std::fs::create_dir_all(out)?;
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    std::fs::write(out.join("vocab.txt"), klue_like_vocab().join("\n") + "\n")?;
    std::fs::write(
        out.join("tokenizer_config.json"),
        r#"{"do_lower_case": false, "tokenizer_class": "BertTokenizer", "model_max_length": 512}"#,
    )?;
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": 12,
        "intermediate_size": ff,
        "hidden_act": "gelu",
        "max_position_embeddings": pos,
        "type_vocab_size": types,
        "vocab_size": KLUE_VOCAB,
        "layer_norm_eps": 1e-12,
        "position_embedding_type": "absolute",
        "_source": format!("klue/bert-base configuration, random weights (seed {seed}), written by streambed"),
    });
    write_sentence_transformers_files(out, &config, "mean", false, pos)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_has_klue_shape() {
        let v = klue_like_vocab();
        assert_eq!(v.len(), KLUE_VOCAB);
        assert_eq!(v[2], "[CLS]");
        assert!(v.contains(&"##한".to_string()));
    }
}
