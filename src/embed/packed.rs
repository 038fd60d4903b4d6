//! Attention over packed sequences, for the CPU forward pass without padding.
//!
//! A batch's token rows are stored back to back (`(tokens, 3·hidden)` for Q, K and V), so
//! the linear layers, which are nearly all of the work, only ever see real tokens: a
//! stream's batch of mixed lengths no longer pays for the longest sentence's length in
//! every row. Attention, the one step that mixes rows, runs per sentence and head here,
//! straight from the packed buffer, in one op per layer.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

use super::ops::SendPtr;

/// Self-attention for packed sequences: input `(tokens, 3·hidden)` = [Q | K | V], each
/// `heads × head_dim`; output `(tokens, hidden)`.
pub struct PackedAttention<'a> {
    /// `(first row, length)` of each sequence.
    pub spans: &'a [(usize, usize)],
    pub heads: usize,
    pub head_dim: usize,
}

impl PackedAttention<'_> {
    pub fn run(&self, qkv: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; qkv.len() / 3];
        self.run_into(qkv, &mut out);
        out
    }

    /// As [`PackedAttention::run`], into `out` (`(tokens, hidden)`).
    pub fn run_into(&self, qkv: &[f32], out: &mut [f32]) {
        let hidden = self.heads * self.head_dim;
        let tokens = qkv.len() / (3 * hidden);
        assert!(out.len() >= tokens * hidden, "attention output shape");
        assert!(
            self.spans.iter().all(|s| s.0 + s.1 <= tokens),
            "attention spans past the rows"
        );
        let ptr = SendPtr(out.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> = self
            .spans
            .iter()
            .flat_map(|&(off, len)| (0..self.heads).map(move |h| (off, len, h)))
            .collect();
        tasks.par_iter().for_each(|&(off, len, head)| {
            let ptr = &ptr;
            let mut scores = vec![0f32; len];
            // SAFETY: each task writes rows off..off+len, columns of `head` only; the
            // spans do not overlap and lie inside `out`.
            unsafe { attend(self, qkv, (off, len, head), &mut scores, ptr.0) };
        });
    }
}

/// One sentence (`off`, `len`) and one head.
///
/// # Safety
/// `out` points at a `(tokens, hidden)` buffer that rows `off..off + len` fit in.
unsafe fn attend(
    op: &PackedAttention,
    qkv: &[f32],
    task: (usize, usize, usize),
    scores: &mut [f32],
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        return attend_avx512(op, qkv, task, scores, out);
    }
    attend_loop(op, qkv, task, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    op: &PackedAttention,
    qkv: &[f32],
    task: (usize, usize, usize),
    scores: &mut [f32],
    out: *mut f32,
) {
    attend_loop(op, qkv, task, scores, out)
}

/// Sum of products in 16 independent lanes, so the compiler can vectorise it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = a.len() / 16 * 16;
    for (ca, cb) in a[..chunks]
        .chunks_exact(16)
        .zip(b[..chunks].chunks_exact(16))
    {
        for l in 0..16 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        s += x * y;
    }
    s
}

#[inline(always)]
unsafe fn attend_loop(
    op: &PackedAttention,
    qkv: &[f32],
    (off, len, head): (usize, usize, usize),
    scores: &mut [f32],
    out: *mut f32,
) {
    let d = op.head_dim;
    let hidden = op.heads * d;
    let row = 3 * hidden;
    let scale = 1.0 / (d as f32).sqrt();
    let at = |t: usize, part: usize| {
        let s = (off + t) * row + part * hidden + head * d;
        &qkv[s..s + d]
    };
    for i in 0..len {
        let q = at(i, 0);
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(q, at(j, 1)) * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        let o = std::slice::from_raw_parts_mut(out.add((off + i) * hidden + head * d), d);
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            let w = p * inv;
            for (x, v) in o.iter_mut().zip(at(j, 2)) {
                *x += w * v;
            }
        }
    }
}

impl CustomOp1 for PackedAttention<'_> {
    fn name(&self) -> &'static str {
        "streambed-packed-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = super::ops::contiguous_f32(self.name(), storage, layout)?;
        let hidden = self.heads * self.head_dim;
        let (tokens, width) = layout.shape().dims2()?;
        if width != 3 * hidden {
            candle_core::bail!(
                "streambed-packed-attention: {width} columns, want {}",
                3 * hidden
            );
        }
        if self.spans.iter().map(|s| s.0 + s.1).max().unwrap_or(0) > tokens {
            candle_core::bail!("streambed-packed-attention: spans past {tokens} rows");
        }
        let out = self.run(qkv);
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Against candle's padded attention for each sequence on its own.
    #[test]
    fn matches_dense_attention_per_sequence() {
        let (heads, d) = (3, 20);
        let hidden = heads * d;
        let spans = [(0, 5), (5, 1), (6, 9)];
        let tokens = 15;
        let mut seed = 11u64;
        let qkv: Vec<f32> = (0..tokens * 3 * hidden)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        let op = PackedAttention {
            spans: &spans,
            heads,
            head_dim: d,
        };
        let got = op.run(&qkv);
        let all = Tensor::from_vec(qkv, (tokens, 3, heads, d), &Device::Cpu).unwrap();
        for &(off, len) in &spans {
            let s = all
                .narrow(0, off, len)
                .unwrap()
                .permute((1, 2, 0, 3))
                .unwrap()
                .contiguous()
                .unwrap();
            let (q, k, v) = (s.get(0).unwrap(), s.get(1).unwrap(), s.get(2).unwrap());
            let scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let p = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let want = p
                .matmul(&v)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((len, hidden))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (i, row) in want.iter().enumerate() {
                for (c, w) in row.iter().enumerate() {
                    let g = got[(off + i) * hidden + c];
                    assert!((g - w).abs() < 1e-5, "row {} col {c}: {g} vs {w}", off + i);
                }
            }
        }
    }
}
