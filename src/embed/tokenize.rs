//! Text to token ids: prefix, Unicode NFC, the model's own tokenizer, truncation at
//! `max_seq_length`. Loads `tokenizer.json`, or builds a BERT WordPiece tokenizer from
//! `vocab.txt` (+ `tokenizer_config.json` for lower-casing) when there is none.

use std::path::Path;

use serde::Deserialize;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    DecoderWrapper, Model, NormalizerWrapper, PaddingParams, PostProcessorWrapper,
    PreTokenizerWrapper, TokenizerImpl,
};
use unicode_normalization::UnicodeNormalization;

use super::unigram::TokModel;
use super::{EmbedError, ItemError};

/// `tokenizers::Tokenizer` with our compact Unigram model in place of the crate's (which
/// takes ~330 MB for a 250k-piece vocabulary; see `unigram`).
type Tokenizer = TokenizerImpl<
    TokModel,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Characters kept before tokenising. A token always covers at least one character, so
/// cutting far past `max_seq_length` characters never changes the kept tokens, while it
/// bounds the work a 10 MB message can cause.
const CHARS_PER_TOKEN_BOUND: usize = 32;

/// One input after tokenisation.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Token ids including the model's special tokens, at most `max_seq_length` long.
    pub ids: Vec<u32>,
    /// The input was longer than `max_seq_length` tokens and was cut.
    pub truncated: bool,
}

#[derive(Debug, Deserialize, Default)]
struct TokenizerConfig {
    do_lower_case: Option<bool>,
    strip_accents: Option<bool>,
    tokenize_chinese_chars: Option<bool>,
}

/// Thread-safe text preparation; clone it freely (the tokenizer is shared).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: std::sync::Arc<Tokenizer>,
    /// The same without truncation, for counting (chunking).
    counting: std::sync::Arc<Tokenizer>,
    prefix: String,
    max_seq_length: usize,
}

impl TextTokenizer {
    pub fn load(dir: &Path, max_seq_length: usize, prefix: &str) -> Result<Self, EmbedError> {
        let json = dir.join("tokenizer.json");
        let mut tokenizer = if json.exists() {
            let text = std::fs::read_to_string(&json).map_err(|e| EmbedError::Model {
                path: json.clone(),
                reason: e.to_string(),
            })?;
            serde_json::from_str::<Tokenizer>(&text).map_err(|e| EmbedError::Model {
                path: json.clone(),
                reason: format!("cannot load tokenizer: {e}"),
            })?
        } else {
            wordpiece_from_vocab(dir)?
        };
        // Folders often pin padding to a fixed length (all-MiniLM-L6-v2 pads to 128); the
        // encoder pads per batch itself, so padding here would only waste compute.
        tokenizer.with_padding(None::<PaddingParams>);
        // Truncation is ours (see `tokenize`), so the one tokenizer also counts whole texts
        // for chunking.
        tokenizer
            .with_truncation(None)
            .map_err(|e| EmbedError::Model {
                path: dir.to_path_buf(),
                reason: format!("cannot unset truncation: {e}"),
            })?;
        let tokenizer = std::sync::Arc::new(tokenizer);
        Ok(Self {
            inner: tokenizer.clone(),
            counting: tokenizer,
            prefix: prefix.to_string(),
            max_seq_length,
        })
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The same tokenizer with another prefix (cheap: the tokenizer is shared).
    pub fn with_prefix(&self, prefix: &str) -> Self {
        Self {
            inner: self.inner.clone(),
            counting: self.counting.clone(),
            prefix: prefix.to_string(),
            max_seq_length: self.max_seq_length,
        }
    }

    /// Tokens of `text` alone (NFC, no prefix, no special tokens, no truncation). A text
    /// the tokenizer cannot read counts as 0 here; tokenising it fails later, per item.
    pub fn count_plain(&self, text: &str) -> usize {
        let text: String = text.nfc().collect();
        self.counting
            .encode(text.as_str(), false)
            .map_or(0, |e| e.len())
    }

    /// Tokens of the prefix and `text` with the special tokens, as the model would see
    /// them untruncated.
    pub fn count_whole(&self, text: &str) -> usize {
        let mut prepared = self.prefix.clone();
        prepared.extend(text.nfc());
        self.counting
            .encode(prepared.as_str(), true)
            .map_or(usize::MAX, |e| e.len())
    }

    /// The ids of `text`'s pieces (no prefix, no special tokens, no truncation), leaving
    /// out pieces without a letter or digit (punctuation, a lone `▁`): the terms of the
    /// `pieces` sparse source. `text` is normalised by the caller.
    pub fn piece_ids(&self, text: &str) -> Vec<u32> {
        let Ok(e) = self.counting.encode(text, false) else {
            return Vec::new();
        };
        e.get_ids()
            .iter()
            .zip(e.get_tokens())
            .filter(|(_, t)| t.chars().any(char::is_alphanumeric))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Byte offsets in `text` where tokens start; `None` when NFC changes the text (the
    /// offsets would point into another string).
    pub fn token_starts(&self, text: &str) -> Option<Vec<usize>> {
        if !unicode_normalization::is_nfc(text) {
            return None;
        }
        let e = self.counting.encode(text, false).ok()?;
        let mut starts: Vec<usize> = e.get_offsets().iter().map(|&(s, _)| s).collect();
        starts.dedup();
        Some(starts)
    }

    /// Prepares one text. Empty or whitespace-only text, or text with nothing the
    /// tokenizer keeps (control characters only), is a permanent per-item error.
    ///
    /// Emptiness is decided from the text, never from token counts: with a SentencePiece
    /// prefix such as e5's `passage: `, the prefix's trailing `▁` merges into a one-word
    /// text, so "prefix + word" can have as many tokens as the prefix alone. A text has
    /// content when some non-special token ends inside it (past the prefix).
    pub fn tokenize(&self, text: &str) -> Result<Tokens, ItemError> {
        self.tokenize_inner(text, true)
    }

    /// As [`tokenize`](Self::tokenize), without the emptiness checks: for a chunk of a
    /// document that has content as a whole.
    pub fn tokenize_unchecked(&self, text: &str) -> Result<Tokens, ItemError> {
        self.tokenize_inner(text, false)
    }

    fn tokenize_inner(&self, text: &str, check: bool) -> Result<Tokens, ItemError> {
        if check
            && text
                .chars()
                .all(|c| c.is_whitespace() || c.is_control() || is_invisible(c))
        {
            return Err(ItemError::EmptyText);
        }
        let limit = self.max_seq_length * CHARS_PER_TOKEN_BOUND;
        let mut prepared = String::with_capacity(self.prefix.len() + text.len().min(limit * 4));
        prepared.push_str(&self.prefix);
        let mut cut = false;
        for (n, c) in text.nfc().enumerate() {
            if n >= limit {
                cut = true;
                break;
            }
            prepared.push(c);
        }
        let encoding = self
            .inner
            .encode(prepared.as_str(), true)
            .map_err(|e| ItemError::Tokenize(e.to_string()))?;
        let text_start = self.prefix.len();
        let has_content = encoding
            .get_offsets()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .any(|(&(start, end), &special)| special == 0 && end > text_start && end > start);
        if check && !has_content {
            return Err(ItemError::EmptyText);
        }
        // Truncation as the tokenizers crate does it for one sequence: the text's tokens are
        // cut, the special tokens the template adds at the end are kept.
        let ids = encoding.get_ids();
        let max = self.max_seq_length;
        let over = ids.len() > max;
        let ids = if over {
            let mask = encoding.get_special_tokens_mask();
            let tail = mask.iter().rev().take_while(|&&m| m == 1).count().min(max);
            let mut kept = ids[..max - tail].to_vec();
            kept.extend_from_slice(&ids[ids.len() - tail..]);
            kept
        } else {
            ids.to_vec()
        };
        Ok(Tokens {
            ids,
            truncated: cut || over,
        })
    }
}

/// Characters that show nothing and mean nothing on their own: format characters (zero
/// width space and joiners, bidi marks, the BOM, soft hyphen, variation selectors, tags)
/// and the Hangul fillers. A text made only of these (and whitespace) is empty, although
/// normalisers leave enough of it behind to produce a token.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E007F}')
}

fn wordpiece_from_vocab(dir: &Path) -> Result<Tokenizer, EmbedError> {
    let vocab = dir.join("vocab.txt");
    if !vocab.exists() {
        return Err(EmbedError::Model {
            path: dir.to_path_buf(),
            reason: "neither tokenizer.json nor vocab.txt is in the folder".into(),
        });
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg: TokenizerConfig = if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EmbedError::Model {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| EmbedError::Model {
            path: cfg_path.clone(),
            reason: format!("invalid JSON: {e}"),
        })?
    } else {
        TokenizerConfig::default()
    };
    let model_err = |reason: String| EmbedError::Model {
        path: vocab.clone(),
        reason,
    };
    let wordpiece = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| model_err(format!("cannot read vocabulary: {e}")))?;
    let id = |t: &str| {
        wordpiece
            .token_to_id(t)
            .ok_or_else(|| model_err(format!("vocabulary lacks {t}")))
    };
    let cls = id("[CLS]")?;
    let sep = id("[SEP]")?;
    let lowercase = cfg.do_lower_case.unwrap_or(true);
    let mut tokenizer = Tokenizer::new(TokModel::Crate(Box::new(wordpiece.into())));
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(
            true,
            cfg.tokenize_chinese_chars.unwrap_or(true),
            cfg.strip_accents,
            lowercase,
        )))
        .map_err(|e| model_err(format!("cannot set the normalizer: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tokenizer)
}
