//! Sentence-similarity evaluation data (KLUE-STS JSON, KorSTS TSV) and the correlation
//! figures reported by `streambed eval`.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

/// A sentence pair with its gold similarity (0-5).
#[derive(Debug, Clone)]
pub struct Pair {
    pub a: String,
    pub b: String,
    pub score: f64,
}

#[derive(Deserialize)]
struct KlueRow {
    sentence1: String,
    sentence2: String,
    labels: KlueLabels,
}

#[derive(Deserialize)]
struct KlueLabels {
    label: f64,
}

/// Reads KLUE-STS (`.json`) or KorSTS (`.tsv`, header row, score in column 5, the
/// sentences in columns 6 and 7, no quoting).
pub fn load_pairs(path: &Path) -> anyhow::Result<Vec<Pair>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        let rows: Vec<KlueRow> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not KLUE-STS JSON", path.display()))?;
        return Ok(rows
            .into_iter()
            .map(|r| Pair {
                a: r.sentence1,
                b: r.sentence2,
                score: r.labels.label,
            })
            .collect());
    }
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 7 {
            bail!(
                "{}:{}: expected 7 tab-separated columns",
                path.display(),
                n + 1
            );
        }
        let score: f64 = cols[4]
            .trim()
            .parse()
            .with_context(|| format!("{}:{}: bad score", path.display(), n + 1))?;
        pairs.push(Pair {
            a: cols[5].to_string(),
            b: cols[6].to_string(),
            score,
        });
    }
    Ok(pairs)
}

/// Every distinct sentence in the file, in first-seen order (benchmark input).
pub fn sentences(pairs: &[Pair]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in pairs {
        for s in [&p.a, &p.b] {
            if seen.insert(s.as_str()) {
                out.push(s.clone());
            }
        }
    }
    out
}

pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let mx = x.iter().sum::<f64>() / n;
    let my = y.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    sxy / (sxx.sqrt() * syy.sqrt())
}

/// Ranks with ties given their average rank (as scipy's spearmanr does).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in &idx[i..=j] {
            r[*k] = avg;
        }
        i = j + 1;
    }
    r
}

pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlations() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 8.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[1.0, 10.0, 100.0, 1000.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
    }
}
