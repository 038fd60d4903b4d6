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
        // A short sentence is one task for all its heads: its Q/K/V rows come in from
        // L3 once and stay in L2 for the other heads (per-head tasks re-fetched them
        // with a 3·hidden stride each time). A long one is a task per head, so one long
        // sentence still spreads over the pool.
        let tasks: Vec<(usize, usize, std::ops::Range<usize>)> = self
            .spans
            .iter()
            .flat_map(|&(off, len)| {
                let per = if len <= WHOLE_SENTENCE { self.heads } else { 1 };
                (0..self.heads)
                    .step_by(per)
                    .map(move |h| (off, len, h..(h + per).min(self.heads)))
            })
            .collect();
        tasks
            .par_iter()
            .for_each_init(Scratch::default, |scratch, (off, len, heads)| {
                let ptr = &ptr;
                for head in heads.clone() {
                    if head + 1 < heads.end {
                        self.prefetch_head(qkv, *off, *len, head + 1);
                    }
                    // SAFETY: each task writes rows off..off+len, columns of its heads
                    // only; the spans do not overlap and lie inside `out`.
                    unsafe { attend(self, qkv, (*off, *len, head), scratch, ptr.0) };
                }
            });
    }

    /// Asks for a head's Q, K and V lines of a sentence while the previous head runs.
    /// Each head reads a few cache lines per row at a 3·hidden stride, which the
    /// hardware prefetchers do not follow: without this, the first reads of every head
    /// waited on L3 (a fifth of attention's time on e5-small).
    fn prefetch_head(&self, qkv: &[f32], off: usize, len: usize, head: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let hidden = self.heads * self.head_dim;
            for t in off..off + len {
                for part in 0..3 {
                    let start = t * 3 * hidden + part * hidden + head * self.head_dim;
                    for at in (start..start + self.head_dim).step_by(16) {
                        // SAFETY: prefetching never faults, and `at` is inside `qkv`
                        // (`run_into` checked the spans against the rows).
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(qkv.as_ptr().add(at).cast()) };
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (qkv, off, len, head);
    }
}

/// Sentences up to this many tokens are one attention task for all heads.
const WHOLE_SENTENCE: usize = 128;

/// One sentence (`off`, `len`) and one head.
///
/// # Safety
/// `out` points at a `(tokens, hidden)` buffer that rows `off..off + len` fit in.
unsafe fn attend(
    op: &PackedAttention,
    qkv: &[f32],
    task: (usize, usize, usize),
    scratch: &mut Scratch,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    match super::gemm::isa() {
        super::gemm::Isa::Avx512 => return attend_avx512(op, qkv, task, scratch, out),
        super::gemm::Isa::Avx2 => return attend_avx2(op, qkv, task, scratch, out),
        super::gemm::Isa::Portable => {}
    }
    attend_loop::<1>(op, qkv, task, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    op: &PackedAttention,
    qkv: &[f32],
    task: (usize, usize, usize),
    scratch: &mut Scratch,
    out: *mut f32,
) {
    attend_loop::<4>(op, qkv, task, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    op: &PackedAttention,
    qkv: &[f32],
    task: (usize, usize, usize),
    scratch: &mut Scratch,
    out: *mut f32,
) {
    attend_loop::<2>(op, qkv, task, scratch, out)
}

/// e^x for x ≤ 0 (softmax after subtracting the max), without a libm call so the loop
/// vectorises: x = n·ln2 + r, e^r by a degree-6 polynomial on |r| ≤ ln2/2, 2^n by the
/// exponent bits. Relative error below 1e-6; below -87 it returns e^-87.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    // n = round(x / ln 2), from the non-negative side so truncation rounds.
    // SAFETY: the value lies in [0.5, 126], inside i32 (and truncation then vectorises).
    let n = -(unsafe { ((-x) * std::f32::consts::LOG2_E + 0.5).to_int_unchecked::<i32>() }) as f32;
    // r = x - n ln 2 in two parts (Cody-Waite), exact enough for n down to -126.
    let r = (x - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // SAFETY: n is a whole number in [-126, 0].
    p * f32::from_bits(((unsafe { n.to_int_unchecked::<i32>() } + 127) as u32) << 23)
}

/// Scratch of one attention task: the sentence's keys transposed (`head_dim` rows of
/// `len` rounded up to 16) and one row of scores.
#[derive(Default)]
pub(crate) struct Scratch {
    kt: Vec<f32>,
    scores: Vec<f32>,
}

/// `QG` is the number of queries [`attend_fixed`] takes at once (as many as the
/// accumulators fit in registers: 4 with 32 vector registers, 2 with 16).
#[inline(always)]
unsafe fn attend_loop<const QG: usize>(
    op: &PackedAttention,
    qkv: &[f32],
    (off, len, head): (usize, usize, usize),
    scratch: &mut Scratch,
    out: *mut f32,
) {
    match op.head_dim {
        32 => return attend_fixed::<32, QG>(op, qkv, (off, len, head), scratch, out),
        64 => return attend_fixed::<64, QG>(op, qkv, (off, len, head), scratch, out),
        _ => {}
    }
    let d = op.head_dim;
    let hidden = op.heads * d;
    let row = 3 * hidden;
    let scale = 1.0 / (d as f32).sqrt();
    let at = |t: usize, part: usize| {
        let s = (off + t) * row + part * hidden + head * d;
        &qkv[s..s + d]
    };
    // Kᵀ, so a query's scores against 16 keys are one vector FMA per dimension.
    let lp = len.div_ceil(16) * 16;
    scratch.kt.clear();
    scratch.kt.resize(d * lp, 0.0);
    for j in 0..len {
        for (t, &v) in at(j, 1).iter().enumerate() {
            scratch.kt[t * lp + j] = v;
        }
    }
    scratch.scores.resize(lp, 0.0);
    let scores = &mut scratch.scores[..lp];
    for i in 0..len {
        scores.fill(0.0);
        for (t, &q) in at(i, 0).iter().enumerate() {
            let q = q * scale;
            for (s, &k) in scores.iter_mut().zip(&scratch.kt[t * lp..(t + 1) * lp]) {
                *s += q * k;
            }
        }
        let live = &mut scores[..len];
        softmax(live);
        let o = std::slice::from_raw_parts_mut(out.add((off + i) * hidden + head * d), d);
        o.fill(0.0);
        for (j, &p) in live.iter().enumerate() {
            for (x, v) in o.iter_mut().zip(at(j, 2)) {
                *x += p * v;
            }
        }
    }
}

/// [`attend_loop`] for a head size known at compile time (BERT's 64, MiniLM's and
/// e5-small's 32), `QG` queries at a time: their 16 scores per key block, and their
/// output rows, stay in registers, and each key block and value row is loaded once for
/// the group. One query at a time was one chain of dependent FMAs per key block (a
/// quarter of the FMA throughput) and most of attention's time. Keys are stored 16 at a
/// time, `[key block][dim][16]`. (`mul_add` is one FMA instruction in the AVX2/AVX-512
/// builds of this function; only the portable one pays a libm call.)
#[inline(always)]
unsafe fn attend_fixed<const D: usize, const QG: usize>(
    op: &PackedAttention,
    qkv: &[f32],
    (off, len, head): (usize, usize, usize),
    scratch: &mut Scratch,
    out: *mut f32,
) {
    let hidden = op.heads * D;
    let row = 3 * hidden;
    let scale = 1.0 / (D as f32).sqrt();
    let at = |t: usize, part: usize| -> &[f32; D] {
        let s = (off + t) * row + part * hidden + head * D;
        qkv[s..s + D].try_into().expect("head slice")
    };
    let blocks = len.div_ceil(16);
    let lp = blocks * 16;
    scratch.kt.clear();
    scratch.kt.resize(blocks * D * 16, 0.0);
    // Where the AVX-512 kernels run (the processor's choice, as every kernel's: not the
    // query-group size, which the tests run at every value on any processor), a
    // dimension of 16 keys is one gather, not 16 scalar moves.
    #[cfg(target_arch = "x86_64")]
    let gather = super::gemm::isa() == super::gemm::Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    let gather = false;
    if gather {
        #[cfg(target_arch = "x86_64")]
        gather_keys::<D>(
            &qkv[(off * row + hidden + head * D)..],
            row,
            len,
            &mut scratch.kt,
        );
    } else {
        // Through a block-sized slice: indexing the Vec itself re-read its pointer and
        // length after every store (a sixth of attention's time).
        for (b, kb) in scratch.kt.chunks_exact_mut(D * 16).enumerate() {
            for l in 0..16.min(len - b * 16) {
                for (t, &v) in at(b * 16 + l, 1).iter().enumerate() {
                    kb[t * 16 + l] = v;
                }
            }
        }
    }
    scratch.scores.resize(QG * lp, 0.0);
    let mut i0 = 0;
    while i0 < len {
        // Past the sentence's end a group's queries are zeros: their scores are all 0,
        // never softmaxed, so they add nothing, and their outputs are not stored.
        let live = QG.min(len - i0);
        let mut q = [[0f32; D]; QG];
        for (g, qg) in q.iter_mut().enumerate().take(live) {
            for (v, &x) in qg.iter_mut().zip(at(i0 + g, 0)) {
                *v = x * scale;
            }
        }
        for b in 0..blocks {
            let kb = &scratch.kt[b * D * 16..(b + 1) * D * 16];
            let mut acc = [[0f32; 16]; QG];
            for t in 0..D {
                let k = &kb[t * 16..(t + 1) * 16];
                for g in 0..QG {
                    let qv = q[g][t];
                    for l in 0..16 {
                        acc[g][l] = qv.mul_add(k[l], acc[g][l]);
                    }
                }
            }
            for (g, a) in acc.iter().enumerate() {
                scratch.scores[g * lp + b * 16..g * lp + (b + 1) * 16].copy_from_slice(a);
            }
        }
        // Softmax over whole blocks of 16, the padding keys' scores set to -inf (their
        // weights come out ~1e-38 and are never used): no scalar tails. At ~20 tokens
        // the tails were a third of the softmax.
        // Left unnormalised: each output row is scaled by its 1/Σ once, at the end. A
        // pass over the weights just written read them back through the store buffer
        // (stalls: a quarter of e5-small's attention time).
        let mut inv = [0f32; QG];
        for (g, inv) in inv.iter_mut().enumerate().take(live) {
            let sc = &mut scratch.scores[g * lp..(g + 1) * lp];
            sc[len..].fill(f32::NEG_INFINITY);
            *inv = exp_in_place16(sc);
        }
        let mut o = [[0f32; D]; QG];
        for j in 0..len {
            let v = at(j, 2);
            for (g, og) in o.iter_mut().enumerate() {
                let p = scratch.scores[g * lp + j];
                for (x, &vv) in og.iter_mut().zip(v) {
                    *x = p.mul_add(vv, *x);
                }
            }
        }
        for (g, og) in o.iter_mut().enumerate().take(live) {
            for x in og.iter_mut() {
                *x *= inv[g];
            }
            std::ptr::copy_nonoverlapping(
                og.as_ptr(),
                out.add((off + i0 + g) * hidden + head * D),
                D,
            );
        }
        i0 += QG;
    }
}

/// Softmax in place. The exponentials and their sum are separate loops: a running float
/// sum in the same loop is a serial dependency that keeps the compiler from vectorising
/// the exponentials (it was most of the attention's time).
#[inline(always)]
fn softmax(x: &mut [f32]) {
    let max = max16(x);
    for s in x.iter_mut() {
        *s = exp_neg(*s - max);
    }
    let inv = 1.0 / super::ops::sum16(x);
    for s in x.iter_mut() {
        *s *= inv;
    }
}

/// A sentence's keys of one head, `len` rows `row` floats apart from `k[0]`, into
/// `kt` as `[key block][dim][16]` (the padding keys of the last block zero): one masked
/// 16-lane gather per block and dimension.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_keys<const D: usize>(k: &[f32], row: usize, len: usize, kt: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(kt.len() >= len.div_ceil(16) * D * 16 && k.len() >= (len - 1) * row + D);
    let index = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(row as i32),
    );
    for (b, kb) in kt
        .chunks_exact_mut(D * 16)
        .take(len.div_ceil(16))
        .enumerate()
    {
        let live = (len - b * 16).min(16);
        let mask = ((1u32 << live) - 1) as u16;
        let base = k.as_ptr().add(b * 16 * row);
        for t in 0..D {
            let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, index, base.add(t));
            _mm512_storeu_ps(kb.as_mut_ptr().add(t * 16), v);
        }
    }
}

/// Softmax's numerators in place, `e^(x - max)`, for a length that is a multiple of 16;
/// returns 1/Σ. The sum is kept in 16 lanes beside the exponentials (one pass, and it
/// vectorises), not read back from the values just stored.
#[inline(always)]
fn exp_in_place16(x: &mut [f32]) -> f32 {
    debug_assert!(x.len().is_multiple_of(16));
    let max = max16(x);
    let mut acc = [0f32; 16];
    for c in x.chunks_exact_mut(16) {
        for l in 0..16 {
            let e = exp_neg(c[l] - max);
            c[l] = e;
            acc[l] += e;
        }
    }
    1.0 / acc.iter().sum::<f32>()
}

/// The largest value, in 16 lanes so it vectorises.
#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let whole = x.len() / 16 * 16;
    for c in x[..whole].chunks_exact(16) {
        for l in 0..16 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let tail = x[whole..].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m.iter().fold(tail, |a, &b| a.max(b))
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

    #[test]
    fn exp_matches_libm_below_zero() {
        let mut worst = 0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (got, want) = (exp_neg(x), x.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-6, "relative error {worst}");
        assert_eq!(exp_neg(-1000.0), exp_neg(-87.0));
        assert!(exp_neg(f32::NEG_INFINITY) < 1e-37);
    }

    /// Against candle's padded attention for each sequence on its own.
    #[test]
    fn matches_dense_attention_per_sequence() {
        // Head sizes of the dynamic path and both fixed ones; sentences past one block
        // of 16 keys.
        for (heads, d) in [(3, 20), (2, 32), (2, 64)] {
            check_attention(heads, d);
        }
    }

    fn check_attention(heads: usize, d: usize) {
        let hidden = heads * d;
        // The last is past WHOLE_SENTENCE: a task per head.
        let spans = [(0, 5), (5, 1), (6, 40), (46, WHOLE_SENTENCE + 2)];
        let tokens = 46 + WHOLE_SENTENCE + 2;
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
        // This processor's path, and every query-group size any path uses.
        let runs = [
            op.run(&qkv),
            run_grouped::<1>(&op, &qkv),
            run_grouped::<2>(&op, &qkv),
            run_grouped::<4>(&op, &qkv),
        ];
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
            for (r, got) in runs.iter().enumerate() {
                for (i, row) in want.iter().enumerate() {
                    for (c, w) in row.iter().enumerate() {
                        let g = got[(off + i) * hidden + c];
                        assert!(
                            (g - w).abs() < 1e-5,
                            "run {r}: row {} col {c}: {g} vs {w}",
                            off + i
                        );
                    }
                }
            }
        }
    }

    /// Every sentence and head through `attend_loop` with `QG` queries at a time.
    fn run_grouped<const QG: usize>(op: &PackedAttention, qkv: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; qkv.len() / 3];
        let mut scratch = Scratch::default();
        for &(off, len) in op.spans {
            for head in 0..op.heads {
                // SAFETY: the spans lie inside `out`, as `run_into` asserts.
                unsafe {
                    attend_loop::<QG>(op, qkv, (off, len, head), &mut scratch, out.as_mut_ptr())
                };
            }
        }
        out
    }
}
