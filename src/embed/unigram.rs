//! A compact SentencePiece Unigram model for the `tokenizers` pipeline.
//!
//! The `tokenizers` crate keeps a Unigram vocabulary in a byte trie with a hash map per
//! node; for the 250k pieces of XLM-R-family tokenizers (multilingual-e5) that is about
//! 330 MB of memory for a 17 MB `tokenizer.json`, more than the rest of the worker. Here
//! the pieces live in one string, ordered once by their bytes, and the prefix search walks
//! that order by binary search (the same narrowing a trie does): about 6 MB.
//!
//! Segmentation is the crate's own Viterbi rule, reproduced exactly (tests compare ids with
//! the crate on Korean corpora): every vocabulary piece starting at a character boundary is
//! a candidate, shorter ones first, a later candidate replaces an earlier one only with a
//! strictly higher path score; a character no piece covers becomes `unk` scored
//! `min_score − 10`; consecutive `unk`s are fused into one token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokenizers::models::unigram::UnigramTrainer;
use tokenizers::{Model, Token};

/// As sentencepiece and `tokenizers`: the score an unknown character gets below the
/// lowest piece.
const UNK_PENALTY: f64 = 10.0;

#[derive(Debug)]
pub struct CompactUnigram {
    /// All pieces, concatenated in id order.
    blob: String,
    /// `starts[id]..starts[id + 1]` is piece `id` in `blob`.
    starts: Vec<u32>,
    scores: Vec<f64>,
    /// Ids ordered by piece bytes (equal pieces by id).
    sorted: Vec<u32>,
    unk_id: Option<u32>,
    byte_fallback: bool,
    min_score: f64,
    /// Longest piece, in bytes: the prefix search never looks further.
    max_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum UnigramError {
    #[error("the Unigram vocabulary is empty")]
    Empty,
    #[error("unk_id {0} is outside the vocabulary")]
    UnkOutOfRange(usize),
    #[error("a character has no piece and the model has no unk_id")]
    NoUnk,
}

impl CompactUnigram {
    pub fn new(
        vocab: Vec<(String, f64)>,
        unk_id: Option<usize>,
        byte_fallback: bool,
    ) -> Result<Self, UnigramError> {
        if vocab.is_empty() {
            return Err(UnigramError::Empty);
        }
        if let Some(u) = unk_id.filter(|&u| u >= vocab.len()) {
            return Err(UnigramError::UnkOutOfRange(u));
        }
        let mut blob = String::with_capacity(vocab.iter().map(|(p, _)| p.len()).sum());
        let mut starts = Vec::with_capacity(vocab.len() + 1);
        let mut scores = Vec::with_capacity(vocab.len());
        let mut max_len = 0;
        for (piece, score) in &vocab {
            starts.push(blob.len() as u32);
            blob.push_str(piece);
            scores.push(*score);
            max_len = max_len.max(piece.len());
        }
        starts.push(blob.len() as u32);
        drop(vocab);
        let min_score = scores.iter().copied().fold(f64::INFINITY, f64::min);
        let mut model = Self {
            blob,
            starts,
            scores,
            sorted: Vec::new(),
            unk_id: unk_id.map(|u| u as u32),
            byte_fallback,
            min_score,
            max_len,
        };
        let mut sorted: Vec<u32> = (0..model.scores.len() as u32).collect();
        sorted.sort_by(|&a, &b| {
            model
                .piece(a)
                .as_bytes()
                .cmp(model.piece(b).as_bytes())
                .then(a.cmp(&b))
        });
        model.sorted = sorted;
        Ok(model)
    }

    fn piece(&self, id: u32) -> &str {
        let i = id as usize;
        &self.blob[self.starts[i] as usize..self.starts[i + 1] as usize]
    }

    /// Narrows `range` (of `sorted`, all pieces in it starting with a shorter prefix) to
    /// the pieces that start with `prefix`; returns the id whose piece equals `prefix`, if
    /// one does (the last of equal pieces, as a hash map filled in id order would keep).
    fn narrow(&self, range: &mut (usize, usize), prefix: &[u8]) -> Option<u32> {
        let slice = &self.sorted[range.0..range.1];
        let lo = slice.partition_point(|&id| self.piece(id).as_bytes() < prefix);
        let hi = slice.partition_point(|&id| {
            let p = self.piece(id).as_bytes();
            p < prefix || p.starts_with(prefix)
        });
        *range = (range.0 + lo, range.0 + hi);
        let equal = slice[lo..hi]
            .iter()
            .take_while(|&&id| self.piece(id).as_bytes() == prefix)
            .last();
        equal.copied()
    }

    /// The best segmentation of `s`, as byte ranges and ids (unk runs fused).
    fn segment(&self, s: &str) -> Result<Vec<(usize, usize, u32)>, UnigramError> {
        #[derive(Clone, Copy)]
        struct Best {
            score: f64,
            start: usize,
            id: u32,
            set: bool,
        }
        let size = s.len();
        let unk_score = self.min_score - UNK_PENALTY;
        let mut best = vec![
            Best {
                score: 0.0,
                start: 0,
                id: 0,
                set: false,
            };
            size + 1
        ];
        let bytes = s.as_bytes();
        let offer = |best: &mut [Best], end: usize, score: f64, start: usize, id: u32| {
            let t = &mut best[end];
            if !t.set || score > t.score {
                *t = Best {
                    score,
                    start,
                    id,
                    set: true,
                };
            }
        };
        let mut start = 0;
        while start < size {
            let here = best[start].score;
            let first_char = s[start..].chars().next().map_or(1, char::len_utf8);
            let mut single = false;
            let mut range = (0, self.sorted.len());
            let limit = size.min(start + self.max_len);
            let mut end = start + first_char;
            while end <= limit {
                let found = self.narrow(&mut range, &bytes[start..end]);
                if let Some(id) = found {
                    offer(&mut best, end, here + self.scores[id as usize], start, id);
                    single |= end - start == first_char;
                }
                if range.0 == range.1 {
                    break;
                }
                end += s[end..].chars().next().map_or(1, char::len_utf8);
            }
            if !single {
                let unk = self.unk_id.ok_or(UnigramError::NoUnk)?;
                offer(&mut best, start + first_char, here + unk_score, start, unk);
            }
            start += first_char;
        }
        let mut out = Vec::new();
        let mut end = size;
        while end > 0 {
            let node = best[end];
            let is_unk = Some(node.id) == self.unk_id;
            match out.last_mut() {
                // Walking backwards: an unk right before an unk extends it.
                Some((s0, _, id)) if is_unk && Some(*id) == self.unk_id => *s0 = node.start,
                _ => out.push((node.start, end, node.id)),
            }
            end = node.start;
        }
        out.reverse();
        Ok(out)
    }

    fn id_of(&self, token: &str) -> Option<u32> {
        let mut range = (0, self.sorted.len());
        self.narrow(&mut range, token.as_bytes())
    }
}

impl Model for CompactUnigram {
    type Trainer = UnigramTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        let mut tokens = Vec::new();
        for (s, e, id) in self.segment(sequence)? {
            let text = &sequence[s..e];
            if Some(id) != self.unk_id {
                // A piece: `segment` already found its id (the one `id_of` would return).
                tokens.push(Token::new(id, text.to_string(), (s, e)));
                continue;
            }
            // As `tokenizers` does, an unk run is looked up again: it is unknown unless it
            // happens to spell a piece.
            if let Some(id) = self.id_of(text) {
                tokens.push(Token::new(id, text.to_string(), (s, e)));
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<Token>> = text
                    .bytes()
                    .map(|b| {
                        let name = format!("<0x{b:02X}>");
                        self.id_of(&name).map(|id| Token::new(id, name, (s, e)))
                    })
                    .collect();
                if let Some(bytes) = bytes {
                    tokens.extend(bytes);
                    continue;
                }
            }
            let unk = self.unk_id.ok_or(UnigramError::NoUnk)?;
            tokens.push(Token::new(unk, text.to_string(), (s, e)));
        }
        Ok(tokens)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.id_of(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        ((id as usize) < self.scores.len()).then(|| self.piece(id).to_string())
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        (0..self.scores.len() as u32)
            .map(|id| (self.piece(id).to_string(), id))
            .collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.scores.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("streambed's compact Unigram model is read-only".into())
    }

    fn get_trainer(&self) -> Self::Trainer {
        UnigramTrainer::default()
    }
}

/// The tokenizer's model: ours for Unigram vocabularies, the crate's for everything else
/// (WordPiece, BPE, WordLevel).
pub enum TokModel {
    Crate(Box<tokenizers::models::ModelWrapper>),
    Unigram(CompactUnigram),
}

impl<'de> serde::Deserialize<'de> for TokModel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut v = serde_json::Value::deserialize(d)?;
        if v.get("type").and_then(|t| t.as_str()) != Some("Unigram") {
            return tokenizers::models::ModelWrapper::deserialize(v)
                .map(|m| TokModel::Crate(Box::new(m)))
                .map_err(D::Error::custom);
        }
        let vocab: Vec<(String, f64)> = serde_json::from_value(v["vocab"].take())
            .map_err(|e| D::Error::custom(format!("Unigram vocab: {e}")))?;
        let unk_id = v.get("unk_id").and_then(|u| u.as_u64()).map(|u| u as usize);
        let byte_fallback = v
            .get("byte_fallback")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        CompactUnigram::new(vocab, unk_id, byte_fallback)
            .map(TokModel::Unigram)
            .map_err(D::Error::custom)
    }
}

impl Model for TokModel {
    type Trainer = tokenizers::models::TrainerWrapper;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        match self {
            TokModel::Crate(m) => m.tokenize(sequence),
            TokModel::Unigram(m) => m.tokenize(sequence),
        }
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            TokModel::Crate(m) => m.token_to_id(token),
            TokModel::Unigram(m) => m.token_to_id(token),
        }
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match self {
            TokModel::Crate(m) => m.id_to_token(id),
            TokModel::Unigram(m) => m.id_to_token(id),
        }
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        match self {
            TokModel::Crate(m) => m.get_vocab(),
            TokModel::Unigram(m) => m.get_vocab(),
        }
    }

    fn get_vocab_size(&self) -> usize {
        match self {
            TokModel::Crate(m) => m.get_vocab_size(),
            TokModel::Unigram(m) => m.get_vocab_size(),
        }
    }

    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        match self {
            TokModel::Crate(m) => m.save(folder, prefix),
            TokModel::Unigram(m) => m.save(folder, prefix),
        }
    }

    fn get_trainer(&self) -> Self::Trainer {
        match self {
            TokModel::Crate(m) => m.get_trainer(),
            TokModel::Unigram(m) => m.get_trainer().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(pieces: &[(&str, f64)]) -> CompactUnigram {
        let v = pieces.iter().map(|(p, s)| (p.to_string(), *s)).collect();
        CompactUnigram::new(v, Some(0), false).unwrap()
    }

    fn pieces(m: &CompactUnigram, s: &str) -> Vec<String> {
        m.tokenize(s)
            .unwrap()
            .into_iter()
            .map(|t| t.value)
            .collect()
    }

    /// The example from `tokenizers`' own documentation of `Unigram::encode`.
    #[test]
    fn best_path_and_fused_unknowns() {
        let m = model(&[
            ("<unk>", 0.0),
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("d", 0.0),
            ("cd", 1.0),
            ("ab", 2.0),
            ("abc", 5.0),
            ("abcd", 10.0),
        ]);
        assert_eq!(pieces(&m, "abcdacdxx"), ["abcd", "a", "cd", "xx"]);
        let ids: Vec<u32> = m
            .tokenize("abcdacdxx")
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, [8, 1, 5, 0]);
    }

    #[test]
    fn multibyte_and_ties() {
        let m = model(&[
            ("<unk>", 0.0),
            ("한", -1.0),
            ("국", -1.0),
            ("한국", -2.0),
            ("어", -1.0),
        ]);
        // Tie between 한+국 (-2) and 한국 (-2): the first candidate found (한국, reached
        // from position 0 before 국 is reached from 한's end) stays.
        assert_eq!(pieces(&m, "한국어😀"), ["한국", "어", "😀"]);
        assert_eq!(m.tokenize("😀").unwrap()[0].id, 0);
        assert_eq!(pieces(&m, ""), Vec::<String>::new());
    }

    #[test]
    fn byte_fallback_spells_unknown_bytes() {
        let v = vec![
            ("<unk>".to_string(), 0.0),
            ("a".to_string(), -1.0),
            ("<0xC3>".to_string(), -1.0),
            ("<0xA9>".to_string(), -1.0),
        ];
        let m = CompactUnigram::new(v, Some(0), true).unwrap();
        assert_eq!(pieces(&m, "aé"), ["a", "<0xC3>", "<0xA9>"]);
    }
}
