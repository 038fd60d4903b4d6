//! What a sentence-transformers folder says about its model: the BERT configuration
//! (`config.json`), the pooling (`1_Pooling/config.json`), whether the output is
//! L2-normalised (`modules.json` lists `Normalize`), and the maximum sequence length
//! (`sentence_bert_config.json`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::EmbedError;

/// The subset of a Hugging Face `config.json` that a BERT encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

impl Pooling {
    pub fn as_str(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Max => "max",
        }
    }
}

#[derive(Debug, Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// Everything read from a model folder before any weight is touched.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub bert: BertConfig,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Tokens per input including special tokens; longer inputs are truncated.
    pub max_seq_length: usize,
    pub weights: PathBuf,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EmbedError> {
    let text = std::fs::read_to_string(path).map_err(|e| EmbedError::Model {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| EmbedError::Model {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

impl ModelSpec {
    /// Reads the folder's configuration files. A folder without `modules.json` is treated
    /// as a plain BERT checkpoint: mean pooling, no normalisation (what sentence-transformers
    /// does when it wraps a bare transformers model).
    pub fn read(dir: &Path) -> Result<Self, EmbedError> {
        let bert: BertConfig = read_json(&dir.join("config.json"))?;
        let arch_ok = bert.model_type.as_deref().is_none_or(|t| t == "bert")
            && bert
                .architectures
                .as_ref()
                .is_none_or(|a| a.iter().any(|a| a.starts_with("Bert")));
        if !arch_ok {
            return Err(EmbedError::Model {
                path: dir.join("config.json"),
                reason: format!(
                    "model_type {:?} / architectures {:?} is not a BERT model; streambed runs BertModel encoders",
                    bert.model_type, bert.architectures
                ),
            });
        }
        if bert
            .position_embedding_type
            .as_deref()
            .is_some_and(|p| p != "absolute")
        {
            return Err(EmbedError::Model {
                path: dir.join("config.json"),
                reason: "only position_embedding_type=absolute is supported".into(),
            });
        }
        if !bert.hidden_size.is_multiple_of(bert.num_attention_heads) {
            return Err(EmbedError::Model {
                path: dir.join("config.json"),
                reason: "hidden_size is not a multiple of num_attention_heads".into(),
            });
        }

        let mut pooling_dir = None;
        let mut normalize = false;
        let modules = dir.join("modules.json");
        if modules.exists() {
            let entries: Vec<ModuleEntry> = read_json(&modules)?;
            for m in entries {
                if m.kind.ends_with("Pooling") {
                    pooling_dir = Some(dir.join(&m.path));
                } else if m.kind.ends_with("Normalize") {
                    normalize = true;
                } else if m.kind.ends_with("Dense") {
                    return Err(EmbedError::Model {
                        path: modules.clone(),
                        reason: "a Dense module after pooling is not supported".into(),
                    });
                }
            }
        }
        let pooling_dir = pooling_dir.unwrap_or_else(|| dir.join("1_Pooling"));
        let pooling_file = pooling_dir.join("config.json");
        let pooling = if pooling_file.exists() {
            let p: PoolingFile = read_json(&pooling_file)?;
            if p.pooling_mode_mean_sqrt_len_tokens {
                return Err(EmbedError::Model {
                    path: pooling_file,
                    reason: "pooling_mode_mean_sqrt_len_tokens is not supported".into(),
                });
            }
            match (
                p.pooling_mode_mean_tokens,
                p.pooling_mode_cls_token,
                p.pooling_mode_max_tokens,
            ) {
                (true, false, false) => Pooling::Mean,
                (false, true, false) => Pooling::Cls,
                (false, false, true) => Pooling::Max,
                _ => {
                    return Err(EmbedError::Model {
                        path: pooling_file,
                        reason: "exactly one of mean, cls or max pooling must be set".into(),
                    })
                }
            }
        } else {
            Pooling::Mean
        };

        let sbert = dir.join("sentence_bert_config.json");
        let configured = if sbert.exists() {
            read_json::<SentenceBertConfig>(&sbert)?.max_seq_length
        } else {
            None
        };
        let max_seq_length = configured
            .unwrap_or(bert.max_position_embeddings)
            .min(bert.max_position_embeddings);

        let weights = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| EmbedError::Model {
                path: dir.to_path_buf(),
                reason: "no model.safetensors or pytorch_model.bin in the folder".into(),
            })?;

        Ok(Self {
            dir: dir.to_path_buf(),
            bert,
            pooling,
            normalize,
            max_seq_length,
            weights,
        })
    }
}
