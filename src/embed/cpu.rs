//! The CPU encoder layers without candle in between: packed token rows (no padding), our
//! own linear kernels (`gemm`, `qlinear`) with bias, GELU and residual in their epilogue,
//! and two parallel regions per layer.
//!
//! Everything in a layer but attention is row-local: the output projection, its residual
//! and LayerNorm, the feed-forward pair and its LayerNorm, and the next layer's Q/K/V
//! projection only read the same token's row. So a layer is (1) attention, in tasks per
//! sentence (per head for long ones, see `packed`), then (2) one task per block of rows
//! that runs all of the rest for its rows, with its intermediates in the thread's own
//! buffers (still in cache for the next matmul). The pool's work stealing balances the
//! blocks, so that a core taken away by another process (the Kafka client, a neighbour on
//! a shared VM) can slow the pass by its share instead of stalling every barrier of a
//! per-op schedule.
//!
//! Batches too short to give every thread several row blocks (a single query) split each
//! matmul by columns instead, op by op.

use std::cell::RefCell;

use rayon::prelude::*;

use super::amx::{aligned, LINE};
use super::gemm::{self, Epilogue, Isa, RowLinear};
use super::ops::SendPtr;

/// LayerNorm weights, for rows of `gamma.len()` values.
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub eps: f32,
}

impl Norm {
    /// `out = LN(x)` for one row.
    #[inline(always)]
    fn row(&self, x: &[f32], out: &mut [f32]) {
        let h = x.len() as f32;
        let mean = super::ops::sum16(x) / h;
        let mut var = [0f32; 16];
        let whole = x.len() / 16 * 16;
        for c in x[..whole].chunks_exact(16) {
            for l in 0..16 {
                let d = c[l] - mean;
                var[l] += d * d;
            }
        }
        let mut v: f32 = var.iter().sum();
        for &e in &x[whole..] {
            v += (e - mean) * (e - mean);
        }
        let inv = 1.0 / (v / h + self.eps).sqrt();
        for (((o, &e), &g), &b) in out.iter_mut().zip(x).zip(&self.gamma).zip(&self.beta) {
            *o = (e - mean) * inv * g + b;
        }
    }

    /// LayerNorm of `rows` rows of `x` into `out`.
    pub fn rows(&self, x: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match super::gemm::isa() {
            // SAFETY: the features were detected on this processor.
            super::gemm::Isa::Avx512 => return unsafe { self.rows_avx512(x, out) },
            // SAFETY: as above.
            super::gemm::Isa::Avx2 => return unsafe { self.rows_avx2(x, out) },
            super::gemm::Isa::Portable => {}
        }
        self.rows_loop(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(&self, x: &[f32], out: &mut [f32]) {
        self.rows_loop(x, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_avx512(&self, x: &[f32], out: &mut [f32]) {
        self.rows_loop(x, out)
    }

    #[inline(always)]
    fn rows_loop(&self, x: &[f32], out: &mut [f32]) {
        let h = self.gamma.len();
        for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
            self.row(xr, or);
        }
    }
}

/// One encoder layer's parts, borrowed from the model.
pub struct CpuLayer<'a> {
    pub qkv: &'a dyn RowLinear,
    pub attn_out: &'a dyn RowLinear,
    pub attn_norm: &'a Norm,
    pub intermediate: &'a dyn RowLinear,
    pub output: &'a dyn RowLinear,
    pub out_norm: &'a Norm,
}

thread_local! {
    /// The Q/K/V, context and hidden rows of the pass in progress on this thread.
    static PASS: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// A thread's row-block intermediates: `(rows, hidden)` and `(rows, intermediate)`.
    static BLOCK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A layer's weights from which each matmul is split by columns over the whole batch
/// instead of running the layer per row block (see `block_rows`).
const STREAM_ONCE_BYTES: usize = 16 << 20;

/// Rows per block: enough for the micro-kernels' tiles and to reuse each weight panel,
/// few enough that every thread gets several blocks to steal. `None`: no row blocks,
/// every matmul split by columns over all the rows.
///
/// Row blocks read the whole layer's weights once per block (at batch 32, ~10 times a
/// batch). Where a layer's weights are large (BERT-base f32: 28 MiB a layer, 340 MiB in
/// all, past what the cache keeps) that traffic, from both cores at once, costs more than
/// the barrier per matmul of the column split, which reads each weight once a batch:
/// on Intel Xeon (AVX-512, 2 cores) BERT-base f32 ran 72–75 sent/s split by columns
/// against 63–65 in row blocks, interleaved, while e5-small f32 (7 MiB a layer) and every
/// int8 model (7 MiB for BERT-base) ran slower split by columns (int8: 30% slower, each
/// column part quantising all the rows again, which it no longer does). On AMD EPYC Zen 3
/// (AVX2, 2 cores, 32 MiB of L3) BERT-base f32 split by columns won 8 of 11 interleaved
/// pairs, median +6%, and int8 lost 5–8% even with its rows quantised once
/// (docs/PERFORMANCE.md, sessions 12 and 13).
///
/// Blocks are a multiple of 12 rows (the AVX-512 f32 tile), or of the layers' own
/// `row_align` where that is more (AMX int8 computes 32 rows at a time: a 72-row block
/// would compute 96).
fn block_rows(tokens: usize, threads: usize, columns: bool, align: usize) -> Option<usize> {
    const MIN: usize = 12;
    const MAX: usize = 96;
    if columns || tokens < threads * 2 * MIN {
        return None;
    }
    let step = if align > 1 { align } else { MIN };
    let want = tokens.div_ceil(threads * 6);
    Some(want.clamp(step, MAX.max(step)).div_ceil(step) * step)
}

/// Runs the encoder layers over packed rows: `x` is `(tokens, hidden)` after the
/// embeddings' LayerNorm, and holds the last layer's output on return. `attention`
/// turns `(tokens, 3·hidden)` Q/K/V rows into `(tokens, hidden)` context rows.
pub fn encode(
    layers: &[CpuLayer],
    x: &mut [f32],
    hidden: usize,
    attention: &(dyn Fn(&[f32], &mut [f32]) + Sync),
    between: &mut dyn FnMut(),
) {
    let layer_bytes = layers.first().map_or(0, |l| {
        [l.qkv, l.attn_out, l.intermediate, l.output]
            .iter()
            .map(|lin| lin.weight_bytes())
            .sum()
    });
    let columns = split_by_columns(layer_bytes, gemm::isa());
    let align = layers.first().map_or(1, |l| l.qkv.row_align());
    encode_scheduled(layers, x, hidden, attention, between, (columns, align));
}

/// Whether a layer of `layer_bytes` of weights runs split by columns (see `block_rows`).
/// The portable loop keeps row blocks: it is too slow for the weight traffic to matter.
fn split_by_columns(layer_bytes: usize, isa: Isa) -> bool {
    isa != Isa::Portable && layer_bytes >= STREAM_ONCE_BYTES
}

/// [`encode`], in row blocks (of a multiple of `align` rows) or (`columns`, or a batch
/// too small for blocks) split by columns.
fn encode_scheduled(
    layers: &[CpuLayer],
    x: &mut [f32],
    hidden: usize,
    attention: &(dyn Fn(&[f32], &mut [f32]) + Sync),
    between: &mut dyn FnMut(),
    (columns, align): (bool, usize),
) {
    let Some(first) = layers.first() else {
        return;
    };
    let tokens = x.len() / hidden;
    let threads = rayon::current_num_threads().max(1);
    // Reused across batches (fresh pages cost a fault each). Taken out of the cell, not
    // borrowed: a query cut in at `between` runs a nested `encode` on this thread.
    let (mut qkv_rows, mut ctx_rows, mut x_rows) = PASS.with(|c| c.take());
    let qkv = on_lines(&mut qkv_rows, tokens * 3 * hidden);
    let ctx = on_lines(&mut ctx_rows, tokens * hidden);
    let caller_x = x;
    let x = on_lines(&mut x_rows, caller_x.len());
    x.copy_from_slice(caller_x);
    linear_all(first.qkv, x, tokens, qkv, &Epilogue::Bias, threads);
    for (i, layer) in layers.iter().enumerate() {
        attention(qkv, ctx);
        let next = layers.get(i + 1).map(|l| l.qkv);
        match block_rows(tokens, threads, columns, align) {
            Some(block) => {
                let xp = SendPtr(x.as_mut_ptr());
                let qp = SendPtr(qkv.as_mut_ptr());
                let ctx = &*ctx;
                (0..tokens.div_ceil(block)).into_par_iter().for_each(|b| {
                    let (xp, qp) = (&xp, &qp);
                    let r0 = b * block;
                    let m = block.min(tokens - r0);
                    // SAFETY: each task owns rows r0..r0+m of `x` and `qkv`, which no
                    // other task of this loop reads or writes.
                    let (xr, qr) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(xp.0.add(r0 * hidden), m * hidden),
                            std::slice::from_raw_parts_mut(
                                qp.0.add(r0 * 3 * hidden),
                                m * 3 * hidden,
                            ),
                        )
                    };
                    let cr = &ctx[r0 * hidden..(r0 + m) * hidden];
                    BLOCK.with(|cell| {
                        let (a, inter) = &mut *cell.borrow_mut();
                        rest_of_layer(layer, next, cr, xr, qr, m, (a, inter), 1);
                    });
                });
            }
            None => {
                // Taken out of the cell, as `PASS`: a thread waiting in a parallel
                // matmul may run other work that encodes.
                let (mut a, mut inter) = BLOCK.with(|c| c.take());
                // In spans of at most `SPAN_ROWS`: each still reads a weight once for
                // hundreds of rows, and a long batch's intermediate rows stay bounded.
                let mut r0 = 0;
                while r0 < tokens {
                    let m = SPAN_ROWS.min(tokens - r0);
                    rest_of_layer(
                        layer,
                        next,
                        &ctx[r0 * hidden..(r0 + m) * hidden],
                        &mut x[r0 * hidden..(r0 + m) * hidden],
                        &mut qkv[r0 * 3 * hidden..(r0 + m) * 3 * hidden],
                        m,
                        (&mut a, &mut inter),
                        threads,
                    );
                    r0 += m;
                }
                BLOCK.with(|c| c.replace((a, inter)));
            }
        }
        between();
    }
    // Kept only up to a typical batch's size: a rare long batch must not hold its
    // buffers for the life of the worker (the backlog memory bound, docs/PERFORMANCE.md).
    caller_x.copy_from_slice(x);
    if qkv_rows.capacity() <= KEEP_FLOATS {
        PASS.with(|c| c.replace((qkv_rows, ctx_rows, x_rows)));
    }
}

/// Rows per span when a layer is split by columns (BERT-base: 12 MiB of intermediate).
const SPAN_ROWS: usize = 1024;

/// 16 MiB of Q/K/V rows (BERT-base: ~2,700 tokens).
const KEEP_FLOATS: usize = 4 << 20;

/// Everything of a layer after attention, for `m` rows: `x = LN(ctx Wₒ + b + x)`,
/// `x = LN(gelu(x W₁ + b₁) W₂ + b₂ + x)`, then the next layer's `qkv = x W_qkv + b`.
/// With `threads` > 1 each matmul is split by columns over the pool.
#[allow(clippy::too_many_arguments)]
fn rest_of_layer(
    layer: &CpuLayer,
    next_qkv: Option<&dyn RowLinear>,
    ctx: &[f32],
    x: &mut [f32],
    qkv: &mut [f32],
    m: usize,
    (a, inter): (&mut Vec<f32>, &mut Vec<f32>),
    threads: usize,
) {
    let hidden = layer.attn_out.n();
    let a = on_lines(a, m * hidden);
    let inter = on_lines(inter, m * layer.intermediate.n());
    linear_all(
        layer.attn_out,
        ctx,
        m,
        a,
        &Epilogue::BiasResidual(x),
        threads,
    );
    layer.attn_norm.rows(a, x);
    linear_all(
        layer.intermediate,
        x,
        m,
        inter,
        &Epilogue::BiasGelu,
        threads,
    );
    linear_all(
        layer.output,
        inter,
        m,
        a,
        &Epilogue::BiasResidual(x),
        threads,
    );
    layer.out_norm.rows(a, x);
    if let Some(q) = next_qkv {
        linear_all(q, x, m, qkv, &Epilogue::Bias, threads);
    }
}

/// `len` floats of `v` from a 64-byte line on, so that a row of a multiple of 16 floats
/// starts on a line and the tiles' 64-byte stores and loads never span two.
fn on_lines(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len + LINE / 4, 0.0);
    let at = aligned(v);
    &mut v[at..at + len]
}

/// `out = epi(x Wᵀ)` for `m` rows: sequential with one thread, else split by columns.
fn linear_all(
    lin: &dyn RowLinear,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    epi: &Epilogue,
    threads: usize,
) {
    assert!(
        out.len() >= m * lin.n() && x.len() >= m * lin.k(),
        "linear shapes"
    );
    let units = lin.units();
    let parts = if threads > 1 {
        (3 * threads).min(units)
    } else {
        1
    };
    if parts <= 1 {
        // SAFETY: `out` holds m rows of n; all units are written by this call alone.
        unsafe { lin.run(x, m, out.as_mut_ptr(), epi, 0..units) };
        return;
    }
    // SAFETY: `out` holds m rows of n; the parts write disjoint columns.
    unsafe { lin.run_split(x, m, out.as_mut_ptr(), epi, parts) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_the_definition() {
        let h = 37;
        let x: Vec<f32> = (0..3 * h)
            .map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0)
            .collect();
        let norm = Norm {
            gamma: (0..h).map(|i| 1.0 + i as f32 / 100.0).collect(),
            beta: (0..h).map(|i| i as f32 / 50.0).collect(),
            eps: 1e-12,
        };
        let mut out = vec![0f32; x.len()];
        norm.rows(&x, &mut out);
        for r in 0..3 {
            let row = &x[r * h..(r + 1) * h];
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / h as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / h as f64;
            for c in 0..h {
                let want = (row[c] as f64 - mean) / var.sqrt() * norm.gamma[c] as f64
                    + norm.beta[c] as f64;
                let got = out[r * h + c] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "row {r} col {c}: {got} vs {want}"
                );
            }
        }
    }

    /// Whatever the allocator returned and however the length changes between calls,
    /// the rows start on a 64-byte line and are as long as asked.
    #[test]
    fn rows_start_on_a_line() {
        let mut v = Vec::new();
        for len in [1, 768, 3 * 768 * 7, 5, 3072 * 13] {
            let rows = on_lines(&mut v, len);
            assert_eq!(rows.len(), len);
            assert_eq!(rows.as_ptr() as usize % LINE, 0, "len {len}");
        }
    }

    #[test]
    fn blocks_only_when_every_thread_gets_several() {
        assert_eq!(block_rows(10, 2, false, 1), None);
        assert_eq!(block_rows(47, 2, false, 1), None);
        let b = block_rows(600, 2, false, 1).unwrap();
        assert!(b.is_multiple_of(12) && 600usize.div_ceil(b) >= 6, "{b}");
        assert_eq!(block_rows(100_000, 2, false, 1), Some(96));
        assert_eq!(block_rows(100_000, 2, true, 1), None);
        // Whole AMX tiles: 600 rows want ~50 a block, 64 it is.
        assert_eq!(block_rows(600, 2, false, 32), Some(64));
        assert_eq!(block_rows(60, 2, false, 32), Some(32));
        assert_eq!(block_rows(100_000, 2, false, 32), Some(96));
    }

    #[test]
    fn large_layers_split_by_columns() {
        // BERT-base f32 (28 MiB a layer) vs e5-small f32 and BERT-base int8 (7 MiB).
        assert!(split_by_columns(28 << 20, Isa::Avx512));
        assert!(split_by_columns(28 << 20, Isa::Avx2));
        assert!(!split_by_columns(7 << 20, Isa::Avx512));
        assert!(!split_by_columns(7 << 20, Isa::Avx2));
        assert!(!split_by_columns(28 << 20, Isa::Portable));
    }

    /// Both schedules compute the same rows: row blocks, and the column split in spans
    /// (more tokens than one span, the last span short).
    #[test]
    fn row_blocks_and_column_spans_agree() {
        use crate::embed::gemm::PackedLinear;
        let (h, i, layers) = (32, 64, 2);
        let tokens = 2 * SPAN_ROWS + 37;
        let mut seed = 0x9e37_79b9_u32;
        let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed as f32 / u32::MAX as f32 - 0.5) * scale
                })
                .collect()
        };
        let mut lin = |n: usize, k: usize| PackedLinear::new(&rnd(n * k, 0.4), &rnd(n, 0.2), n, k);
        let parts: Vec<_> = (0..layers)
            .map(|_| (lin(3 * h, h), lin(h, h), lin(i, h), lin(h, i)))
            .collect();
        let norm = Norm {
            gamma: vec![1.0; h],
            beta: vec![0.0; h],
            eps: 1e-12,
        };
        let cpu: Vec<CpuLayer> = parts
            .iter()
            .map(|(qkv, o, up, down)| CpuLayer {
                qkv,
                attn_out: o,
                attn_norm: &norm,
                intermediate: up,
                output: down,
                out_norm: &norm,
            })
            .collect();
        // A per-row stand-in for attention: the context row is the query row, halved.
        let attention = |qkv: &[f32], ctx: &mut [f32]| {
            for (c, q) in ctx.chunks_mut(h).zip(qkv.chunks(3 * h)) {
                for (o, v) in c.iter_mut().zip(q) {
                    *o = v * 0.5;
                }
            }
        };
        let x0 = rnd(tokens * h, 2.0);
        let run = |columns: bool| {
            let mut x = x0.clone();
            encode_scheduled(&cpu, &mut x, h, &attention, &mut || {}, (columns, 1));
            x
        };
        let (rows, cols) = (run(false), run(true));
        let worst = rows
            .iter()
            .zip(&cols)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "schedules differ by {worst}");
        assert!(rows != x0, "the layers ran");
    }
}
