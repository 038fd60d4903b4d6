//! Documents: one message (or backfill line) is one document, stored as one point per
//! chunk.
//!
//! Payload of every chunk (besides the message's own fields; see `sink::fields`):
//! `document_id` (the UUID of the document's first chunk, which is the id a document had
//! before it was split), `chunk_index`, `chunk_count`, `chunk_start`/`chunk_end` (the span in
//! the original text, in code points: `original[start:end]` in Python), `text` (that span)
//! and `content_hash`.
//!
//! A document's chunks are written in the order 1, 2, ..., n-1, then the stale chunks of
//! earlier versions (index >= n) are deleted, and the first chunk (index 0) goes last. So
//! the first chunk carrying a content hash means the whole version is in the store, which
//! is what the unchanged-document check relies on; the offset is committed only after it.

use std::ops::Range;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chunk;
use crate::embed::{ItemError, TextTokenizer, Tokens};
use crate::settings::{ChunkMode, ChunkSettings};

/// Payload fields that say where a message was read, not what it says: they differ
/// between a message and its replay, so the content hash leaves them out.
const POSITION_FIELDS: &[&str] = &[
    "text",
    "topic",
    "partition",
    "offset",
    "timestamp_ms",
    "file",
    "line",
];

/// How documents are cut and recognised, fixed for a run.
pub struct Documents {
    tokenizer: TextTokenizer,
    mode: ChunkMode,
    max_tokens: usize,
    overlap: usize,
    /// Tokens left for text once the prefix and the special tokens are counted.
    budget: usize,
    pub skip_unchanged: bool,
    /// Part of the content hash: what else decides the vectors (model, precision, prefix,
    /// chunking, sparse terms).
    fingerprint: String,
    /// Makes each point's sparse vector, in collections that have one.
    lexer: Option<crate::sparse::Lexer>,
}

/// How one document becomes chunks.
pub enum Plan {
    /// One point: the text fits (or `truncate` mode), tokenised.
    Whole(Tokens),
    /// Several chunks, as byte ranges of the text.
    Chunks(Vec<Range<usize>>),
}

struct Counter<'a> {
    tokenizer: &'a TextTokenizer,
    max_tokens: usize,
}

impl chunk::Counter for Counter<'_> {
    fn count(&self, text: &str) -> usize {
        self.tokenizer.count_plain(text)
    }
    fn token_starts(&self, text: &str) -> Option<Vec<usize>> {
        self.tokenizer.token_starts(text)
    }
    fn fits(&self, text: &str) -> bool {
        self.tokenizer.count_whole(text) <= self.max_tokens
    }
}

impl Documents {
    /// `model` names the model and how it runs (any change to it changes the vectors).
    /// Fails, naming the key, when the settings do not fit the model.
    pub fn new(tokenizer: TextTokenizer, s: &ChunkSettings, model: &str) -> Result<Self, String> {
        let limit = tokenizer.max_seq_length();
        let max_tokens = if s.max_tokens == 0 {
            limit
        } else {
            s.max_tokens
        };
        if max_tokens > limit {
            return Err(format!(
                "chunk.max_tokens is {max_tokens}, but the model reads at most {limit} tokens; \
                 set it to {limit} or less (0 = the model's limit)"
            ));
        }
        let overhead = tokenizer.count_whole("");
        if overhead + 8 > max_tokens {
            return Err(format!(
                "chunk.max_tokens is {max_tokens}, which leaves no room for text after the prefix \
                 and special tokens ({overhead} tokens); raise it"
            ));
        }
        let budget = max_tokens - overhead;
        if 2 * s.overlap_tokens >= budget {
            return Err(format!(
                "chunk.overlap_tokens is {}, but must be under half of the {budget} text tokens \
                 a chunk holds; lower it",
                s.overlap_tokens
            ));
        }
        let fingerprint = format!(
            "{model}\u{0}{}\u{0}{:?}\u{0}{max_tokens}\u{0}{}",
            tokenizer.prefix(),
            s.mode,
            s.overlap_tokens
        );
        Ok(Self {
            tokenizer,
            mode: s.mode,
            max_tokens,
            overlap: s.overlap_tokens,
            budget,
            skip_unchanged: s.skip_unchanged,
            fingerprint,
            lexer: None,
        })
    }

    /// Gives every point a sparse vector made by `lexer` (and makes its settings part of
    /// the content hash).
    pub fn with_sparse(mut self, lexer: crate::sparse::Lexer) -> Self {
        self.fingerprint.push('\u{0}');
        self.fingerprint.push_str(&lexer.fingerprint());
        self.lexer = Some(lexer);
        self
    }

    /// The sparse vector of one point's text, where points have one.
    pub fn sparse(&self, text: &str) -> Option<crate::sink::SparseVector> {
        self.lexer.as_ref().map(|l| l.document(text))
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Hash of everything the document's points are made from: text, metadata (not where
    /// the message was read), model, prefix and chunking.
    pub fn content_hash(&self, text: &str, payload: &Map<String, Value>) -> String {
        let mut h = Sha256::new();
        h.update(self.fingerprint.as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        // serde_json's Map is ordered by key, so equal metadata hashes equally.
        for (k, v) in payload {
            if !POSITION_FIELDS.contains(&k.as_str()) {
                h.update([0]);
                h.update(k.as_bytes());
                h.update([0]);
                h.update(v.to_string().as_bytes());
            }
        }
        hex::encode(&h.finalize()[..16])
    }

    /// Decides how `text` is stored. Fails only for text with nothing to embed.
    pub fn plan(&self, text: &str) -> Result<Plan, ItemError> {
        let tokens = self.tokenizer.tokenize(text)?;
        if self.mode == ChunkMode::Truncate
            || (!tokens.truncated && tokens.ids.len() <= self.max_tokens)
        {
            return Ok(Plan::Whole(tokens));
        }
        let counter = Counter {
            tokenizer: &self.tokenizer,
            max_tokens: self.max_tokens,
        };
        Ok(Plan::Chunks(chunk::split(
            text,
            self.budget,
            self.overlap,
            &counter,
        )))
    }

    /// Token ids of one chunk of a document that has content (a chunk of only invisible
    /// characters is still embedded, as the model reads it).
    pub fn tokenize_chunk(&self, text: &str) -> Result<Tokens, ItemError> {
        self.tokenizer.tokenize_unchecked(text)
    }
}

/// Byte offsets to code-point offsets, for offsets visited in increasing order.
pub struct CharCursor<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl<'a> CharCursor<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            byte: 0,
            chars: 0,
        }
    }

    /// The code-point index of byte offset `b` (at or after the last one asked for).
    pub fn at(&mut self, b: usize) -> usize {
        if b < self.byte {
            self.byte = 0;
            self.chars = 0;
        }
        self.chars += self.text[self.byte..b].chars().count();
        self.byte = b;
        self.chars
    }
}
