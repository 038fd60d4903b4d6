//! Lexical sparse vectors: BM25 term weights of a text, for exact words, names, numbers and
//! codes that dense vectors miss. The store multiplies each weight by the term's IDF (the
//! sparse vector is created with Qdrant's `idf` modifier), so a query's score is BM25:
//! `Σ idf(t) · tf·(k1+1) / (tf + k1·(1 − b + b·len/avg_len))` over the query's terms.
//!
//! Documents and queries go through the same term source. Text is NFC-normalised first,
//! fullwidth ASCII folded and letters lower-cased; there is no stemming and no stop list
//! (IDF takes care of frequent terms). The sources (measured in docs/RETRIEVAL.md):
//! - `bigrams`: each run of Hangul (or Han, kana) characters gives its overlapping
//!   character bigrams (a one-character run itself), so a noun matches whatever particle
//!   follows it (`서울에서`, `서울의` share `서울`); each run of other letters and digits is one
//!   term (`ktx`, `7731`), and a word with inner punctuation (`kr-7731-ㄱ`, `010-1234-5678`,
//!   `3.14`) is also a term whole, so an exact code outweighs its parts;
//! - `pieces`: the model's own subword pieces (its tokenizer, no special tokens).

use std::collections::HashMap;

use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::embed::tokenize::TextTokenizer;
use crate::sink::SparseVector;

/// Where the terms of a text come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TermSource {
    Bigrams,
    Pieces,
}

impl TermSource {
    pub fn name(self) -> &'static str {
        match self {
            TermSource::Bigrams => "bigrams",
            TermSource::Pieces => "pieces",
        }
    }
}

/// `[sparse]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseSettings {
    pub enabled: bool,
    /// The sparse vector's name in the collection.
    pub name: String,
    pub terms: TermSource,
    /// BM25 term-frequency saturation.
    pub k1: f32,
    /// BM25 length normalisation (0: none, 1: full).
    pub b: f32,
    /// The typical number of terms in a point's text (BM25's average length).
    pub avg_terms: f32,
}

/// Characters of a text that give terms; the rest of a longer text is not indexed.
pub const MAX_CHARS: usize = 65_536;

/// Longest word kept whole besides its parts (longer ones are noise, not codes).
const MAX_WHOLE_WORD: usize = 40;

/// Makes sparse vectors with one term source and one set of BM25 parameters.
#[derive(Clone)]
pub struct Lexer {
    name: String,
    source: TermSource,
    tokenizer: Option<TextTokenizer>,
    k1: f32,
    b: f32,
    avg_terms: f32,
}

/// 32-bit FNV-1a: a stable term id (the same in every build and on every machine, which
/// `std`'s hasher does not promise).
fn term_id(term: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in term.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Written without spaces between words: Hangul, Han, kana.
    Syllabic,
    /// Other letters and digits.
    Word,
    Other,
}

fn class(c: char) -> Class {
    match c as u32 {
        0xAC00..=0xD7A3 // Hangul syllables
        | 0x1100..=0x11FF | 0x3130..=0x318F | 0xA960..=0xA97F | 0xD7B0..=0xD7FF // jamo
        | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF // Han
        | 0x3040..=0x30FF => Class::Syllabic, // kana
        _ if c.is_alphanumeric() => Class::Word,
        _ => Class::Other,
    }
}

/// NFC, fullwidth ASCII folded, lower-cased; at most [`MAX_CHARS`] characters.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_CHARS * 3));
    for c in text.nfc().take(MAX_CHARS) {
        let c = match c as u32 {
            0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            0x3000 => ' ',
            _ => c,
        };
        if c.is_uppercase() {
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The `bigrams` terms of normalised text, in order.
fn bigram_terms(text: &str, out: &mut Vec<u32>) {
    let mut buf = String::new();
    for word in text.split(char::is_whitespace) {
        // Runs of one class inside the word.
        let chars: Vec<char> = word.chars().collect();
        let mut i = 0;
        let mut runs = 0;
        while i < chars.len() {
            let k = class(chars[i]);
            let mut j = i + 1;
            while j < chars.len() && class(chars[j]) == k {
                j += 1;
            }
            match k {
                Class::Syllabic if j - i == 1 => {
                    buf.clear();
                    buf.push(chars[i]);
                    out.push(term_id(&buf));
                }
                Class::Syllabic => {
                    for w in chars[i..j].windows(2) {
                        buf.clear();
                        buf.extend(w);
                        out.push(term_id(&buf));
                    }
                }
                Class::Word => {
                    buf.clear();
                    buf.extend(&chars[i..j]);
                    out.push(term_id(&buf));
                }
                Class::Other => {}
            }
            if k != Class::Other {
                runs += 1;
            }
            i = j;
        }
        // A code or number written with inner punctuation is also a term whole.
        let whole = word.trim_matches(|c: char| class(c) == Class::Other);
        let inner_punct = whole.chars().any(|c| class(c) == Class::Other);
        if runs > 1 && inner_punct && whole.chars().count() <= MAX_WHOLE_WORD {
            out.push(term_id(whole));
        }
    }
}

impl Lexer {
    /// `tokenizer` is the model's, needed for [`TermSource::Pieces`].
    pub fn new(s: &SparseSettings, tokenizer: Option<&TextTokenizer>) -> Result<Self, String> {
        if s.terms == TermSource::Pieces && tokenizer.is_none() {
            return Err("sparse.terms = \"pieces\" needs the model's tokenizer".into());
        }
        Ok(Self {
            name: s.name.clone(),
            source: s.terms,
            tokenizer: (s.terms == TermSource::Pieces)
                .then(|| tokenizer.cloned())
                .flatten(),
            k1: s.k1,
            b: s.b,
            avg_terms: s.avg_terms,
        })
    }

    /// The sparse vector's name in the collection.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> TermSource {
        self.source
    }

    /// Everything that decides a document's weights (part of its content hash).
    pub fn fingerprint(&self) -> String {
        format!(
            "sparse:{}:{}:{}:{}",
            self.source.name(),
            self.k1,
            self.b,
            self.avg_terms
        )
    }

    /// The term ids of `text`, in order, repeats included.
    pub fn terms(&self, text: &str) -> Vec<u32> {
        let text = normalize(text);
        let mut out = Vec::new();
        match self.source {
            TermSource::Bigrams => bigram_terms(&text, &mut out),
            TermSource::Pieces => {
                let t = self.tokenizer.as_ref().expect("pieces need the tokenizer");
                out = t.piece_ids(&text);
            }
        }
        out
    }

    /// BM25 document weights of `text` (IDF is the store's).
    pub fn document(&self, text: &str) -> SparseVector {
        let terms = self.terms(text);
        let len = terms.len() as f32;
        let mut tf: HashMap<u32, u32> = HashMap::with_capacity(terms.len());
        for t in terms {
            *tf.entry(t).or_default() += 1;
        }
        let norm = self.k1 * (1.0 - self.b + self.b * len / self.avg_terms.max(1.0));
        SparseVector::from_pairs(tf.into_iter().map(|(t, n)| {
            let n = n as f32;
            (t, n * (self.k1 + 1.0) / (n + norm))
        }))
    }

    /// A query's vector: weight 1 for each distinct term, so that its score against a
    /// document is the document's BM25 for the query.
    pub fn query(&self, text: &str) -> SparseVector {
        SparseVector::from_pairs(self.terms(text).into_iter().map(|t| (t, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bigrams(text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        bigram_terms(&normalize(text), &mut out);
        out
    }

    fn ids(terms: &[&str]) -> Vec<u32> {
        terms.iter().map(|t| term_id(t)).collect()
    }

    #[test]
    fn korean_runs_become_bigrams_and_other_words_whole_terms() {
        assert_eq!(bigrams("서울에서"), ids(&["서울", "울에", "에서"]));
        assert_eq!(bigrams("책"), ids(&["책"]));
        assert_eq!(bigrams("KTX 2대"), ids(&["ktx", "2", "대"]));
        // The code, its parts, and the code whole.
        assert_eq!(
            bigrams("(KR-7731-ㄱ)"),
            ids(&["kr", "7731", "ㄱ", "kr-7731-ㄱ"])
        );
        assert_eq!(bigrams("3.14를"), ids(&["3", "14", "를", "3.14를"]));
        // Fullwidth letters, emoji and punctuation.
        assert_eq!(bigrams("ＡＢＣ 😀!!"), ids(&["abc"]));
        assert!(bigrams("  \n ").is_empty());
    }

    #[test]
    fn decomposed_hangul_gives_the_same_terms() {
        let composed = "한국어";
        let decomposed: String = composed.nfd().collect();
        assert_ne!(composed, decomposed);
        assert_eq!(bigrams(composed), bigrams(&decomposed));
    }

    #[test]
    fn bm25_weights_saturate_and_normalise_length() {
        let s = SparseSettings {
            enabled: true,
            name: "bm25".into(),
            terms: TermSource::Bigrams,
            k1: 1.2,
            b: 0.75,
            avg_terms: 4.0,
        };
        let lexer = Lexer::new(&s, None).unwrap();
        let weight = |text: &str, term: &str| {
            let v = lexer.document(text);
            let id = term_id(term);
            v.indices.iter().position(|&i| i == id).map(|p| v.values[p])
        };
        let once = weight("abc def", "abc").unwrap();
        let twice = weight("abc abc def", "abc").unwrap();
        let thrice = weight("abc abc abc def", "abc").unwrap();
        assert!(twice > once && thrice > twice);
        assert!(thrice - twice < twice - once, "saturates");
        // The same count in a longer text weighs less.
        let long = weight("abc d e f g h i j k l", "abc").unwrap();
        assert!(long < once);
        // A query weighs each distinct term once.
        let q = lexer.query("abc abc def");
        assert_eq!(q.values, vec![1.0, 1.0]);
        // Sorted unique indices, as the store requires.
        let d = lexer.document("가나다 가나다 라마 7731 라마");
        assert!(d.indices.windows(2).all(|w| w[0] < w[1]));
    }
}
