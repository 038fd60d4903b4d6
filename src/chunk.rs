//! Splitting a document into chunks that fit the model.
//!
//! A chunk is a span of the original text (what is stored can be shown as is), at most
//! `budget` tokens of the model's own tokenizer (the caller subtracts the prefix and the
//! special tokens from `max_tokens`), and the chunks together cover every character.
//!
//! The text is read as units: a unit is the whitespace before a word and the word, where
//! a word also ends after a sentence end written without a space (`했다.그리고`). The
//! whitespace goes at the front of a unit because SentencePiece tokenizers count a word
//! with its leading space as one piece (`▁word`), so unit counts add up to the count of
//! their concatenation. Between two units is a boundary with a level: paragraph (a blank
//! line), line, sentence (after `다.`, `요.`, `?`, `!`, `。`, ...), word, and token (inside a
//! unit longer than the budget, cut where the tokenizer starts a token, never inside a
//! character or a grapheme cluster).
//!
//! Units are packed greedily; when the next does not fit, the chunk ends at the
//! highest-level boundary that keeps it at least half full (the latest of equals), so
//! chunks end at paragraph and sentence ends where the text has them. The next chunk
//! starts up to `overlap` tokens (whole units) before the end of the last one. Every
//! chunk is checked against the tokenizer as a whole before it is kept.
//!
//! Work and memory are bounded by the chunk size, not the document: the units of one
//! chunk are held at a time, and a unit longer than the budget is cut window by window.

use std::ops::Range;

use unicode_segmentation::UnicodeSegmentation;

/// What the splitter needs from the model's tokenizer.
pub trait Counter {
    /// Tokens of `text` alone (no prefix, no special tokens).
    fn count(&self, text: &str) -> usize;
    /// Byte offsets in `text` at which tokens start, or `None` when they cannot be mapped
    /// back onto `text` exactly (text that Unicode normalisation changes).
    fn token_starts(&self, text: &str) -> Option<Vec<usize>>;
    /// Whether `text`, with the prefix and the special tokens, fits `max_tokens`.
    fn fits(&self, text: &str) -> bool;
}

/// How strong the boundary before a unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Token,
    Word,
    Sentence,
    Line,
    Paragraph,
}

#[derive(Debug, Clone)]
struct Unit {
    range: Range<usize>,
    tokens: usize,
    /// The boundary before this unit.
    level: Level,
}

/// A window of a long unit's text is at most this many characters per budget token:
/// enough for any tokenizer (a token covers at least one character), and it bounds work.
const CHARS_PER_TOKEN: usize = 32;

fn is_terminal(c: char) -> bool {
    matches!(
        c,
        '.' | '?' | '!' | '。' | '？' | '！' | '…' | '‥' | '｡' | '؟' | '।'
    )
}

fn is_closer(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | ')' | ']' | '}' | '”' | '’' | '」' | '』' | '）' | '》' | '〉' | '】'
    )
}

fn is_hangul_syllable(c: char) -> bool {
    ('\u{AC00}'..='\u{D7A3}').contains(&c)
}

/// Reads the raw units of `text[..end]`, from `pos` on.
struct Units<'a> {
    text: &'a str,
    pos: usize,
    end: usize,
    /// The previous unit ended a sentence.
    after_terminal: bool,
}

impl Iterator for Units<'_> {
    /// The unit's range and the level of the boundary before it.
    type Item = (Range<usize>, Level);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let rest = &self.text[start..self.end];
        let mut chars = rest.char_indices().peekable();
        let mut newlines = 0;
        while let Some(&(_, c)) = chars.peek() {
            if !c.is_whitespace() {
                break;
            }
            if c == '\n' {
                newlines += 1;
            }
            chars.next();
        }
        let level = if newlines >= 2 {
            Level::Paragraph
        } else if newlines == 1 {
            Level::Line
        } else if self.after_terminal {
            Level::Sentence
        } else {
            Level::Word
        };
        let mut prev: Option<char> = None;
        let mut unit_end = rest.len();
        let mut ends_terminal = false;
        while let Some((i, c)) = chars.next() {
            if c.is_whitespace() {
                unit_end = i;
                break;
            }
            if is_terminal(c) {
                // The whole run of terminals and closing quotes stays with its sentence.
                let hangul_before = prev.is_some_and(is_hangul_syllable);
                let mut j = i + c.len_utf8();
                let mut last = c;
                while let Some(&(k, d)) = chars.peek() {
                    if is_terminal(d) || is_closer(d) {
                        last = d;
                        j = k + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                match chars.peek() {
                    None => {
                        ends_terminal = true;
                        unit_end = rest.len();
                        break;
                    }
                    Some(&(_, d)) if d.is_whitespace() => {
                        ends_terminal = true;
                        unit_end = j;
                        break;
                    }
                    Some(&(_, d)) => {
                        // Written without a space: a sentence end only where it cannot be
                        // a number, an abbreviation or an address (`3.14`, `naver.com`).
                        let cut = if c == '.' {
                            hangul_before && !d.is_ascii_digit()
                        } else {
                            true
                        };
                        if cut {
                            ends_terminal = true;
                            unit_end = j;
                            break;
                        }
                        prev = Some(last);
                        continue;
                    }
                }
            }
            prev = Some(c);
        }
        self.after_terminal = ends_terminal;
        self.pos = start + unit_end;
        Some((start..start + unit_end, level))
    }
}

/// Cuts `text[range]`, a unit over the budget, into pieces of at most `budget` tokens at
/// token starts (moved back to a grapheme boundary).
fn split_long(
    text: &str,
    range: Range<usize>,
    level: Level,
    budget: usize,
    c: &impl Counter,
    out: &mut Vec<Unit>,
) {
    let mut pos = range.start;
    let mut level = level;
    while pos < range.end {
        let rest = &text[pos..range.end];
        let window_chars = budget.max(1) * CHARS_PER_TOKEN;
        let (window, whole) = match rest.char_indices().nth(window_chars) {
            Some((i, _)) => (&rest[..i], false),
            None => (rest, true),
        };
        if whole {
            let n = c.count(window);
            if n <= budget {
                out.push(Unit {
                    range: pos..range.end,
                    tokens: n,
                    level,
                });
                return;
            }
        }
        let graphemes: Vec<usize> = window
            .grapheme_indices(true)
            .map(|(i, _)| i)
            .chain(std::iter::once(window.len()))
            .collect();
        // The last grapheme boundary at or before `b`, but past the start.
        let aligned = |b: usize| -> usize {
            let k = graphemes.partition_point(|&g| g <= b);
            let g = graphemes[k.saturating_sub(1)];
            if g > 0 {
                g
            } else {
                graphemes.get(1).copied().unwrap_or(window.len())
            }
        };
        let mut cut = match c.token_starts(window) {
            Some(starts) if starts.len() > budget => aligned(starts[budget]),
            Some(_) => window.len(),
            None => {
                // Longest prefix (in graphemes) that fits: binary search.
                let (mut lo, mut hi) = (1usize, graphemes.len() - 1);
                while lo < hi {
                    let mid = (lo + hi).div_ceil(2);
                    if c.count(&window[..graphemes[mid]]) <= budget {
                        lo = mid;
                    } else {
                        hi = mid - 1;
                    }
                }
                graphemes[lo]
            }
        };
        // Tokenising the piece alone can differ slightly from its place in the word.
        let mut n = c.count(&window[..cut]);
        while n > budget || !c.fits(&window[..cut]) {
            let shorter = aligned(cut - cut / 16 - 1);
            if shorter >= cut {
                break;
            }
            cut = shorter;
            n = c.count(&window[..cut]);
        }
        out.push(Unit {
            range: pos..pos + cut,
            tokens: n,
            level,
        });
        level = Level::Token;
        pos += cut;
    }
}

/// Splits `text` into chunk byte ranges; see the module comment. An empty or
/// whitespace-only text has no chunks.
pub fn split(text: &str, budget: usize, overlap: usize, c: &impl Counter) -> Vec<Range<usize>> {
    let budget = budget.max(1);
    let overlap = overlap.min(budget / 2);
    let content_end = text.trim_end().len();
    if content_end == 0 {
        return Vec::new();
    }
    let mut raw = Units {
        text,
        pos: 0,
        end: content_end,
        after_terminal: false,
    };
    let mut queue: Vec<Unit> = Vec::new();
    let mut next_unit = |queue: &mut Vec<Unit>| -> Option<Unit> {
        if queue.is_empty() {
            let (range, level) = raw.next()?;
            // A run far longer than any chunk (10 MB without a space) is cut window by
            // window, never tokenised whole.
            if range.len() > budget * CHARS_PER_TOKEN * 4 {
                split_long(text, range, level, budget, c, queue);
                queue.reverse();
                return queue.pop();
            }
            let n = c.count(&text[range.clone()]);
            if n <= budget {
                return Some(Unit {
                    range,
                    tokens: n,
                    level,
                });
            }
            split_long(text, range, level, budget, c, queue);
            queue.reverse();
        }
        queue.pop()
    };

    let mut out: Vec<Range<usize>> = Vec::new();
    let mut window: Vec<Unit> = Vec::new();
    let mut total = 0usize;
    let mut pending: Option<Unit> = None;
    let mut covered = 0usize;
    loop {
        let next = pending.take().or_else(|| next_unit(&mut queue));
        match next {
            Some(u) if window.is_empty() || total + u.tokens <= budget => {
                total += u.tokens;
                window.push(u);
            }
            Some(u) => {
                let j = choose_end(&window, Some(u.level), budget);
                let j = shrink_to_fit(text, &window, j, c);
                emit(&mut out, &mut covered, &window, j);
                let k = overlap_start(&window, j, overlap, budget, u.tokens);
                window.drain(..k);
                total = window.iter().map(|u| u.tokens).sum();
                pending = Some(u);
            }
            None => {
                if window.is_empty() {
                    break;
                }
                let j = shrink_to_fit(text, &window, window.len(), c);
                if window[j - 1].range.end > covered {
                    emit(&mut out, &mut covered, &window, j);
                }
                if j == window.len() {
                    break;
                }
                let k = overlap_start(&window, j, overlap, budget, 0);
                window.drain(..k);
                total = window.iter().map(|u| u.tokens).sum();
            }
        }
    }
    if let Some(last) = out.last_mut() {
        last.end = text.len();
    }
    out
}

/// Where the chunk made of `window` ends (the number of units it keeps): the
/// highest-level boundary that keeps it at least half full, the latest of equals.
/// `next_level` is the boundary after the window (before the unit that did not fit).
fn choose_end(window: &[Unit], next_level: Option<Level>, budget: usize) -> usize {
    let end_level = next_level.unwrap_or(Level::Paragraph);
    let (mut best, mut best_level) = (window.len(), end_level);
    let mut fill = 0;
    for j in 1..window.len() {
        fill += window[j - 1].tokens;
        let level = window[j].level;
        if 2 * fill >= budget && level > end_level && level >= best_level {
            best = j;
            best_level = level;
        }
    }
    best
}

/// Moves the end back while the chunk, tokenised whole, does not fit.
fn shrink_to_fit(text: &str, window: &[Unit], mut j: usize, c: &impl Counter) -> usize {
    while j > 1 && !c.fits(&text[window[0].range.start..window[j - 1].range.end]) {
        j -= 1;
    }
    j
}

fn emit(out: &mut Vec<Range<usize>>, covered: &mut usize, window: &[Unit], j: usize) {
    let r = window[0].range.start..window[j - 1].range.end;
    *covered = r.end;
    out.push(r);
}

/// The first unit of the next chunk: as far back from `j` as `overlap` tokens allow,
/// leaving room for the unit that comes next, and always past the chunk's start.
fn overlap_start(window: &[Unit], j: usize, overlap: usize, budget: usize, next: usize) -> usize {
    let mut k = j;
    let mut kept = 0;
    while k > 1 {
        let t = window[k - 1].tokens;
        if kept + t > overlap || kept + t + next > budget {
            break;
        }
        kept += t;
        k -= 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per character that is not whitespace; starts map exactly.
    struct Chars {
        limit: usize,
    }

    impl Counter for Chars {
        fn count(&self, text: &str) -> usize {
            text.chars().filter(|c| !c.is_whitespace()).count()
        }
        fn token_starts(&self, text: &str) -> Option<Vec<usize>> {
            Some(
                text.char_indices()
                    .filter(|(_, c)| !c.is_whitespace())
                    .map(|(i, _)| i)
                    .collect(),
            )
        }
        fn fits(&self, text: &str) -> bool {
            self.count(text) <= self.limit
        }
    }

    fn check(text: &str, budget: usize, overlap: usize) -> Vec<Range<usize>> {
        let c = Chars { limit: budget };
        let chunks = split(text, budget, overlap, &c);
        assert!(!chunks.is_empty());
        assert_eq!(chunks[0].start, 0);
        assert_eq!(chunks.last().unwrap().end, text.len());
        for w in chunks.windows(2) {
            assert!(
                w[1].start <= w[0].end,
                "gap between {:?} and {:?}",
                w[0],
                w[1]
            );
            assert!(w[1].start > w[0].start && w[1].end > w[0].end);
        }
        for r in &chunks {
            assert!(text.is_char_boundary(r.start) && text.is_char_boundary(r.end));
            assert!(
                c.count(&text[r.clone()]) <= budget,
                "{:?}",
                &text[r.clone()]
            );
            assert!(!text[r.clone()].trim().is_empty());
        }
        chunks
    }

    #[test]
    fn ends_at_sentences_and_paragraphs() {
        let text = "오늘은 날씨가 좋다. 내일은 비가 온다고 한다.\n\n다음 문단이에요. 끝이다.";
        let chunks = check(text, 16, 0);
        for r in &chunks[..chunks.len() - 1] {
            let piece = text[r.clone()].trim_end();
            assert!(
                piece.ends_with('.') || piece.ends_with('다') || piece.ends_with('요'),
                "{piece:?}"
            );
        }
    }

    #[test]
    fn unspaced_sentences_split_after_korean_endings() {
        let text = "그는학교에갔다.그리고집에왔다.비가왔어요?네그래요!3.14는숫자다.";
        let chunks = check(text, 12, 0);
        assert!(text[chunks[0].clone()].ends_with("다."));
        let units: Vec<_> = Units {
            text,
            pos: 0,
            end: text.len(),
            after_terminal: false,
        }
        .map(|(r, _)| &text[r])
        .collect();
        assert_eq!(
            units,
            [
                "그는학교에갔다.",
                "그리고집에왔다.",
                "비가왔어요?",
                "네그래요!",
                "3.14는숫자다."
            ]
        );
    }

    #[test]
    fn long_runs_are_cut_between_tokens_never_inside_a_grapheme() {
        // Unspaced Hangul, emoji with modifiers and joiners, decomposed jamo.
        let mut text = String::new();
        for i in 0..300 {
            text.push_str(["가나다", "👩‍👩‍👧", "👍🏽", "\u{1100}\u{1161}\u{11A8}", "x"][i % 5]);
        }
        let chunks = check(&text, 20, 0);
        for r in &chunks {
            // Each cut is a grapheme boundary of the whole text.
            let bounds: Vec<usize> = text.grapheme_indices(true).map(|(i, _)| i).collect();
            assert!(r.start == 0 || bounds.contains(&r.start));
        }
    }

    #[test]
    fn overlap_repeats_the_tail_of_the_previous_chunk() {
        let words: Vec<String> = (0..200).map(|i| format!("단어{i}")).collect();
        let text = words.join(" ");
        let chunks = check(&text, 40, 10);
        for w in chunks.windows(2) {
            let shared = &text[w[1].start..w[0].end];
            let n = Chars { limit: 0 }.count(shared);
            assert!(n > 0 && n <= 10, "overlap {n} tokens: {shared:?}");
        }
        let no_overlap = check(&text, 40, 0);
        for w in no_overlap.windows(2) {
            assert_eq!(w[1].start, w[0].end);
        }
    }

    #[test]
    fn a_huge_run_without_spaces_is_cut_in_bounded_windows() {
        /// Panics when asked to tokenise more than a window's worth at once.
        struct Bounded;
        impl Counter for Bounded {
            fn count(&self, text: &str) -> usize {
                assert!(
                    text.len() <= 20 * CHARS_PER_TOKEN * 4,
                    "tokenised {} bytes",
                    text.len()
                );
                Chars { limit: 0 }.count(text)
            }
            fn token_starts(&self, text: &str) -> Option<Vec<usize>> {
                self.count(text);
                Chars { limit: 0 }.token_starts(text)
            }
            fn fits(&self, text: &str) -> bool {
                self.count(text) <= 20
            }
        }
        let text = "가".repeat(200_000);
        let chunks = split(&text, 20, 0, &Bounded);
        assert_eq!(chunks.len(), 10_000);
        assert_eq!(chunks.last().unwrap().end, text.len());
    }

    #[test]
    fn short_text_and_whitespace() {
        assert_eq!(check("  한 문장.  ", 10, 2), vec![0..15]);
        assert!(split(" \n\t ", 10, 0, &Chars { limit: 10 }).is_empty());
    }

    #[test]
    fn chunks_that_do_not_fit_whole_are_shortened() {
        /// Counts pieces one token short, as a tokenizer whose pieces merge differently.
        struct Under;
        impl Counter for Under {
            fn count(&self, text: &str) -> usize {
                Chars { limit: 0 }.count(text).saturating_sub(1)
            }
            fn token_starts(&self, _: &str) -> Option<Vec<usize>> {
                None
            }
            fn fits(&self, text: &str) -> bool {
                Chars { limit: 0 }.count(text) <= 12
            }
        }
        let text = "abc def ghi jkl mno pqr stu vwx yz abcdefghijklmnopqrstuvwxyz0123456789";
        let chunks = split(text, 12, 0, &Under);
        for r in &chunks[..chunks.len() - 1] {
            assert!(Under.fits(&text[r.clone()]), "{:?}", &text[r.clone()]);
        }
        assert_eq!(chunks.last().unwrap().end, text.len());
    }
}
