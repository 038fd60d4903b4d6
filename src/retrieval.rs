//! `streambed eval --retrieval`: dense, sparse and hybrid search over a Korean corpus made
//! from STS files, through the real store (Qdrant's engine in process, or a Qdrant server).
//!
//! Corpus: every distinct sentence of the files is one point. Queries: each pair with
//! gold >= 4 gives a query (its first sentence) whose relevant document is its second
//! sentence (a query with several such pairs has several relevant documents); every other
//! sentence is a distractor, and the query's own sentence is not counted when it comes
//! back. Reported: recall@10, MRR@10 and nDCG@10 (binary gains), on all queries and on the
//! slice of queries that hinge on names and numbers: the query and a relevant document
//! share a number, a Latin-script word, or a rare word (a Hangul word of 2+ syllables found
//! in at most [`RARE_DF`] sentences of the corpus, which is mostly names and terms).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use uuid::Uuid;

use crate::commands::ModelArgs;
use crate::embed::{self, Encoder, TextTokenizer};
use crate::settings::{FusionKind, SearchMode, SearchSettings};
use crate::sink::{embedded::EmbeddedSink, Point, Query, Sink, Write};
use crate::sparse::{Lexer, SparseSettings, TermSource};
use crate::sts;

/// Depth of the figures (recall@10, MRR@10, nDCG@10).
const DEPTH: usize = 10;

/// A word in at most this many sentences counts as rare (see the module comment): in
/// practice a word only the query and its document share, which is what a lexical match
/// is for.
pub const RARE_DF: usize = 2;

#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub recall: f64,
    pub mrr: f64,
    pub ndcg: f64,
    pub queries: usize,
}

/// One row of the report: a search configuration on one query set.
#[derive(Debug, Clone)]
pub struct Row {
    pub config: String,
    pub all: Figures,
    pub names_numbers: Figures,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub documents: usize,
    pub queries: usize,
    pub slice_queries: usize,
    /// Of the slice: queries sharing a number, a Latin-script word, a rare word.
    pub slice_kinds: [usize; 3],
    pub rows: Vec<Row>,
    /// Microseconds per text: encoder (batched, as the worker runs it) and sparse vector.
    pub encoder_us: f64,
    pub sparse_us: Vec<(TermSource, f64)>,
    pub avg_terms: Vec<(TermSource, f64)>,
}

struct Corpus {
    docs: Vec<String>,
    /// Query text, its own document (if the text is in the corpus), relevant documents.
    queries: Vec<(String, Option<usize>, HashSet<usize>)>,
    slice: Vec<bool>,
    slice_kinds: [usize; 3],
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

fn is_hangul_word(w: &str) -> bool {
    w.chars().count() >= 2 && w.chars().all(|c| ('\u{AC00}'..='\u{D7A3}').contains(&c))
}

fn build_corpus(files: &[PathBuf]) -> anyhow::Result<Corpus> {
    let mut pairs = Vec::new();
    for f in files {
        pairs.extend(sts::load_pairs(f)?);
    }
    let clean = |s: &str| s.trim().to_string();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut docs = Vec::new();
    for p in &pairs {
        for s in [&p.a, &p.b] {
            let s = clean(s);
            if !s.is_empty() && !index.contains_key(&s) {
                index.insert(s.clone(), docs.len());
                docs.push(s);
            }
        }
    }
    let mut by_query: HashMap<String, HashSet<usize>> = HashMap::new();
    let mut order = Vec::new();
    for p in pairs.iter().filter(|p| p.score >= 4.0) {
        let (a, b) = (clean(&p.a), clean(&p.b));
        if a == b || a.is_empty() || b.is_empty() {
            continue;
        }
        let rel = by_query.entry(a.clone()).or_insert_with(|| {
            order.push(a.clone());
            HashSet::new()
        });
        rel.insert(index[&b]);
    }
    // Document frequency of Hangul words, for the rare-word test.
    let mut df: HashMap<&str, usize> = HashMap::new();
    for d in &docs {
        let unique: HashSet<&str> = words(d).filter(|w| is_hangul_word(w)).collect();
        for w in unique {
            *df.entry(w).or_default() += 1;
        }
    }
    // The words a query may hinge on, by kind: numbers, Latin-script words, rare words.
    let key_terms = |text: &str| -> [HashSet<String>; 3] {
        let mut out: [HashSet<String>; 3] = Default::default();
        for w in words(text) {
            let kind = if w.chars().any(|c| c.is_ascii_digit()) {
                0
            } else if w.chars().count() >= 2 && w.chars().all(|c| c.is_ascii_alphabetic()) {
                1
            } else if is_hangul_word(w) && df.get(w).is_some_and(|&n| n <= RARE_DF) {
                2
            } else {
                continue;
            };
            out[kind].insert(w.to_lowercase());
        }
        out
    };
    let mut queries = Vec::new();
    let mut slice = Vec::new();
    let mut slice_kinds = [0; 3];
    for q in order {
        let rel = by_query.remove(&q).expect("inserted");
        let mine = key_terms(&q);
        let mut shared = [false; 3];
        for &d in &rel {
            let theirs = key_terms(&docs[d]);
            for k in 0..3 {
                shared[k] |= !mine[k].is_disjoint(&theirs[k]);
            }
        }
        for k in 0..3 {
            slice_kinds[k] += usize::from(shared[k]);
        }
        slice.push(shared.iter().any(|s| *s));
        queries.push((q.clone(), index.get(&q).copied(), rel));
    }
    Ok(Corpus {
        docs,
        queries,
        slice,
        slice_kinds,
    })
}

/// recall, reciprocal rank and nDCG at [`DEPTH`] of one ranking.
fn score(ranked: &[usize], relevant: &HashSet<usize>) -> (f64, f64, f64) {
    let top = &ranked[..ranked.len().min(DEPTH)];
    let found = top.iter().filter(|d| relevant.contains(d)).count();
    let rr = top
        .iter()
        .position(|d| relevant.contains(d))
        .map_or(0.0, |p| 1.0 / (p + 1) as f64);
    let dcg: f64 = top
        .iter()
        .enumerate()
        .filter(|(_, d)| relevant.contains(d))
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum();
    let ideal: f64 = (0..relevant.len().min(DEPTH))
        .map(|i| 1.0 / ((i + 2) as f64).log2())
        .sum();
    (found as f64 / relevant.len() as f64, rr, dcg / ideal)
}

fn mean(rows: &[(f64, f64, f64)], keep: impl Fn(usize) -> bool) -> Figures {
    let picked: Vec<&(f64, f64, f64)> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, r)| r)
        .collect();
    let n = picked.len().max(1) as f64;
    Figures {
        recall: picked.iter().map(|r| r.0).sum::<f64>() / n,
        mrr: picked.iter().map(|r| r.1).sum::<f64>() / n,
        ndcg: picked.iter().map(|r| r.2).sum::<f64>() / n,
        queries: picked.len(),
    }
}

fn doc_id(i: usize) -> Uuid {
    Uuid::from_u128(i as u128 + 1)
}

/// Where the eval's collections live.
pub enum Store {
    /// qdrant-edge in this folder.
    Embedded(PathBuf),
    /// A Qdrant server (gRPC URL); collections `streambed-eval-<terms>` are replaced.
    Qdrant(String),
}

async fn open_store(
    store: &Store,
    source: TermSource,
    dim: usize,
    sparse_name: &str,
) -> anyhow::Result<crate::sink::AnySink> {
    let sink = match store {
        Store::Embedded(dir) => crate::sink::AnySink::Embedded(EmbeddedSink::open(
            dir.join(source.name()),
            Some(sparse_name.to_string()),
        )),
        Store::Qdrant(url) => {
            let collection = format!("streambed-eval-{}", source.name());
            let cfg = crate::settings::QdrantSettings {
                url: url.clone(),
                collection: collection.clone(),
                api_key: Default::default(),
                timeout_ms: 60_000,
                max_request_bytes: 4 * 1024 * 1024,
            };
            let client = qdrant_client::Qdrant::from_url(url)
                .skip_compatibility_check()
                .build()?;
            if client.collection_exists(&collection).await? {
                client.delete_collection(&collection).await?;
            }
            crate::sink::AnySink::Qdrant(crate::sink::qdrant::QdrantSink::connect(
                &cfg,
                Some(sparse_name.to_string()),
            )?)
        }
    };
    sink.ensure_collection(dim).await?;
    Ok(sink)
}

/// Runs the evaluation (see the module comment) for each term source in `sources`.
pub async fn eval_retrieval(
    args: &ModelArgs,
    files: &[PathBuf],
    query_prefix: &str,
    sources: &[TermSource],
    store: Store,
) -> anyhow::Result<Report> {
    let corpus = build_corpus(files)?;
    anyhow::ensure!(
        !corpus.queries.is_empty(),
        "no pair with gold >= 4 in the files"
    );
    let m = args.load()?;
    let dir = embed::hub::resolve(&args.model)?;
    let q_tok = TextTokenizer::load(&dir, m.info.max_seq_length, query_prefix)?;

    let embed_all = |tok: &TextTokenizer, texts: &[String]| -> anyhow::Result<Vec<Vec<f32>>> {
        let seqs: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tok.tokenize(t).map(|t| t.ids))
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(seqs.len());
        for part in seqs.chunks(args.batch_size * 8) {
            let refs: Vec<&[u32]> = part.iter().map(Vec::as_slice).collect();
            out.extend(m.encoder.embed(&refs)?);
        }
        Ok(out)
    };
    let started = Instant::now();
    let doc_vecs = crate::util::blocking_here(|| embed_all(&m.tokenizer, &corpus.docs))?;
    let encoder_us = started.elapsed().as_secs_f64() * 1e6 / corpus.docs.len() as f64;
    let q_texts: Vec<String> = corpus.queries.iter().map(|q| q.0.clone()).collect();
    let q_vecs = crate::util::blocking_here(|| embed_all(&q_tok, &q_texts))?;

    let base = SearchSettings {
        mode: SearchMode::Hybrid,
        fusion: FusionKind::Rrf,
        rrf_k: 60,
        dense_weight: 1.0,
        sparse_weight: 1.0,
        prefetch: 100,
    };
    // Hybrid variants measured: RRF at Qdrant's default k (2) and the literature's (60),
    // RRF weighted towards dense, and DBSF. Qdrant's RRF weight divides a source's rank
    // (`1 / ((rank + 1) / weight + k - 1)`): with a large k that flattens the weighted
    // source's ranking instead of strengthening it, so weights are measured at k = 2.
    let rrf = |k: u32, dense: f32| SearchSettings {
        rrf_k: k,
        dense_weight: dense,
        ..base.clone()
    };
    let variants: Vec<(String, SearchSettings)> = vec![
        ("hybrid rrf k=60".into(), rrf(60, 1.0)),
        ("hybrid rrf k=2".into(), rrf(2, 1.0)),
        ("hybrid rrf k=2 weights 2:1".into(), rrf(2, 2.0)),
        ("hybrid rrf k=2 weights 3:1".into(), rrf(2, 3.0)),
        ("hybrid rrf k=2 weights 5:1".into(), rrf(2, 5.0)),
        (
            "hybrid dbsf".into(),
            SearchSettings {
                fusion: FusionKind::Dbsf,
                ..base.clone()
            },
        ),
    ];

    let mut rows = Vec::new();
    let mut sparse_us = Vec::new();
    let mut avg_terms = Vec::new();
    for (k, &source) in sources.iter().enumerate() {
        let probe = SparseSettings {
            enabled: true,
            name: "bm25".into(),
            terms: source,
            k1: 1.2,
            b: 0.75,
            avg_terms: 1.0,
        };
        let probe_lexer = Lexer::new(&probe, Some(&m.tokenizer)).map_err(|e| anyhow::anyhow!(e))?;
        let total: usize = corpus.docs.iter().map(|d| probe_lexer.terms(d).len()).sum();
        let avg = total as f64 / corpus.docs.len() as f64;
        avg_terms.push((source, avg));
        let settings = SparseSettings {
            avg_terms: avg as f32,
            ..probe
        };
        let lexer = Lexer::new(&settings, Some(&m.tokenizer)).map_err(|e| anyhow::anyhow!(e))?;
        let started = Instant::now();
        let sparse: Vec<_> = corpus.docs.iter().map(|d| lexer.document(d)).collect();
        sparse_us.push((
            source,
            started.elapsed().as_secs_f64() * 1e6 / corpus.docs.len() as f64,
        ));
        let sink = open_store(&store, source, m.info.dim, &settings.name).await?;
        let points: Vec<Point> = corpus
            .docs
            .iter()
            .enumerate()
            .zip(doc_vecs.iter().zip(sparse))
            .map(|((i, text), (v, sv))| Point {
                id: doc_id(i),
                vector: v.clone(),
                sparse: Some(sv),
                payload: serde_json::json!({ "text": text })
                    .as_object()
                    .expect("object")
                    .clone(),
            })
            .collect();
        for part in points.chunks(512) {
            sink.write(Write {
                upserts: part.to_vec(),
                ..Default::default()
            })
            .await?;
        }
        let mut configs: Vec<(String, SearchMode, SearchSettings)> = Vec::new();
        if k == 0 {
            configs.push(("dense".into(), SearchMode::Dense, base.clone()));
        }
        configs.push((
            format!("sparse ({})", source.name()),
            SearchMode::Sparse,
            base.clone(),
        ));
        for (name, v) in &variants {
            configs.push((
                format!("{name} ({})", source.name()),
                SearchMode::Hybrid,
                v.clone(),
            ));
        }
        for (config, mode, search) in configs {
            let mut per_query = Vec::with_capacity(corpus.queries.len());
            for ((text, own, relevant), qv) in corpus.queries.iter().zip(&q_vecs) {
                let q = match mode {
                    SearchMode::Dense => Query::Dense(qv.clone()),
                    SearchMode::Sparse => Query::Sparse(lexer.query(text)),
                    _ => crate::search::hybrid(&search, qv.clone(), lexer.query(text), DEPTH + 1),
                };
                let hits = sink.search(q, DEPTH + 1, None).await?;
                let ranked: Vec<usize> = hits
                    .iter()
                    .filter_map(|h| Uuid::parse_str(&h.id).ok())
                    .map(|u| u.as_u128() as usize - 1)
                    .filter(|d| Some(*d) != *own)
                    .collect();
                per_query.push(score(&ranked, relevant));
            }
            rows.push(Row {
                config,
                all: mean(&per_query, |_| true),
                names_numbers: mean(&per_query, |i| corpus.slice[i]),
            });
        }
    }
    Ok(Report {
        documents: corpus.docs.len(),
        queries: corpus.queries.len(),
        slice_queries: corpus.slice.iter().filter(|s| **s).count(),
        slice_kinds: corpus.slice_kinds,
        rows,
        encoder_us,
        sparse_us,
        avg_terms,
    })
}

/// The data files of the shipped corpus, for `--data` left out.
pub fn default_files(root: &Path) -> Vec<PathBuf> {
    vec![
        root.join("datasets/klue-sts/klue-sts-v1.1_dev.json"),
        root.join("datasets/korsts/sts-dev.tsv"),
        root.join("datasets/korsts/sts-train.tsv"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_figures() {
        let rel: HashSet<usize> = [3, 7].into_iter().collect();
        let (r, rr, ndcg) = score(&[1, 3, 2, 7], &rel);
        assert_eq!(r, 1.0);
        assert_eq!(rr, 0.5);
        let ideal = 1.0 + 1.0 / 3f64.log2();
        let got = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        assert!((ndcg - got / ideal).abs() < 1e-12);
        assert_eq!(score(&[1, 2], &rel), (0.0, 0.0, 0.0));
        // Only the first DEPTH count.
        let late: Vec<usize> = (10..20).chain([3]).collect();
        assert_eq!(score(&late, &rel).0, 0.0);
    }
}
