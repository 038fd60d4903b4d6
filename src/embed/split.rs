//! f32 linear layers on Intel AMX bf16 tiles: each f32 weight and input is split into a
//! high and a low bf16 (`x = xh + xl + ε`, `xh` the value rounded to bf16, `xl` the rest
//! rounded to bf16, `|ε| ≤ 2⁻¹⁷·|x|`), and `x·w` is computed as `xh·wh + xh·wl + xl·wh`
//! (the `xl·wl` term, below 2⁻¹⁶ of the product, left out), each bf16 product exact and
//! summed in f32 by `tdpbf16ps`. About 16 significant bits per product instead of f32's
//! 24, every sum in f32: the scheme PyTorch calls "high" float32 matmul precision
//! (`torch.set_float32_matmul_precision`) and oneDNN "bf16x3". Three tile products per
//! step still run several times faster than the AVX-512 f32 kernel (`gemm`), which stays
//! the path where the processor has no AMX-BF16 or the configuration asks for full f32
//! products (`model.f32_matmul = "highest"`).
//!
//! Layout (see [`super::amx::tile_32x32_bf16x3`]): a unit is 32 output channels (two
//! tile blocks of 16); per step of 32 inputs it holds 4096 bytes: the high halves of
//! both blocks, then the low halves, each `[16 pairs][16 channels][2]`. Rows are split
//! per call into the same steps: 32 high bf16 then 32 low ones, 128 bytes a step. Both
//! start on 64-byte lines (a tile load off a line is 6× slower).

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::amx::{self, aligned, LINE, ROWS, TILE};
use super::gemm::{cpu_linear_op, for_each_part, par_forward, Epilogue, RowLinear};

/// Inputs per step: a 64-byte tile row of bf16.
const STEP: usize = 32;
/// bf16 values one tile of weights holds: 16 pairs of inputs × 16 channels × 2.
const TILE_VALUES: usize = ROWS * STEP;
/// Bytes of split rows kept in L2 while every unit's weights pass over them.
const SPAN_BYTES: usize = 256 << 10;

/// Whether this processor runs the split kernel (AMX-BF16, granted by the OS).
pub fn available() -> bool {
    amx::available_bf16()
}

/// How many bf16 products a f32 product becomes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Products {
    /// `xh·wh + xh·wl + xl·wh`: ~16 significant bits ("high").
    Three,
    /// `xh·wh`: bf16's 8 significant bits, sums in f32 ("medium", PyTorch's name for
    /// float32 matmuls in bf16).
    One,
}

impl Products {
    /// bf16 values a value is stored as: high, or high and low.
    fn parts(self) -> usize {
        match self {
            Products::Three => 2,
            Products::One => 1,
        }
    }
}

/// A linear layer `y = x Wᵀ + b` whose products run as bf16 tile products.
pub struct SplitLinear {
    n: usize,
    k: usize,
    products: Products,
    /// `k` rounded up to a whole step.
    kp: usize,
    units: usize,
    /// The packed weights start at `packed[at]`, on a 64-byte line.
    packed: Vec<u16>,
    at: usize,
    /// Padded to whole units.
    bias: Vec<f32>,
}

/// `x` rounded to the nearest bf16 (ties to even), as its 16 bits.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + (b >> 16 & 1)) >> 16) as u16
}

/// `x ≈ hi + lo`, both bf16.
fn split(x: f32) -> (u16, u16) {
    let hi = bf16_bits(x);
    let lo = x - f32::from_bits((hi as u32) << 16);
    (hi, bf16_bits(lo))
}

impl SplitLinear {
    /// `weight` is `(n, k)` row-major (PyTorch's `Linear.weight`), `bias` has `n` values.
    ///
    /// # Panics
    /// Where [`available`] is false: the kernel cannot run here.
    pub fn new(weight: &[f32], bias: &[f32], n: usize, k: usize, products: Products) -> Self {
        assert!(available(), "the split kernel needs AMX-BF16");
        assert_eq!(weight.len(), n * k, "weight shape");
        assert_eq!(bias.len(), n, "bias shape");
        let kp = k.next_multiple_of(STEP);
        let steps = kp / STEP;
        let units = n.div_ceil(TILE);
        let unit_step = unit_step(products);
        let mut packed = vec![0u16; units * steps * unit_step + LINE / 2];
        let at = aligned(&packed);
        let tile = TILE_VALUES;
        for c in 0..n {
            let (unit, block, lane) = (c / TILE, c % TILE / ROWS, c % ROWS);
            for (i, &w) in weight[c * k..(c + 1) * k].iter().enumerate() {
                let (step, pair, half) = (i / STEP, i % STEP / 2, i % 2);
                let base = at + (unit * steps + step) * unit_step + pair * STEP + lane * 2 + half;
                let (hi, lo) = split(w);
                packed[base + block * tile] = hi;
                if products == Products::Three {
                    packed[base + (2 + block) * tile] = lo;
                }
            }
        }
        let mut padded_bias = vec![0f32; units * TILE];
        padded_bias[..n].copy_from_slice(bias);
        Self {
            n,
            k,
            products,
            kp,
            units,
            packed,
            at,
            bias: padded_bias,
        }
    }

    /// `x` is `(m, k)` row-major; returns `(m, n)`, split over the thread pool.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        par_forward(self, x, m, &Epilogue::Bias)
    }

    /// u16 values of one split row.
    fn row_len(&self) -> usize {
        self.products.parts() * self.kp
    }

    /// Splits rows `0..m` of `x` into `rows` (grown, never shrunk; padded to whole tiles
    /// of rows, whose extra rows are read by the kernel and never stored), from
    /// `rows[at]` (returned) on a 64-byte line.
    /// With `pool`, groups of rows are split over the thread pool: one thread splitting
    /// a large product's rows (BERT-base's 3072-wide FFN rows, split by columns) kept
    /// the others waiting.
    fn split_rows(&self, x: &[f32], m: usize, rows: &mut Vec<u16>, pool: bool) -> usize {
        let len = m.next_multiple_of(TILE) * self.row_len() + LINE / 2;
        if rows.len() < len {
            rows.resize(len, 0);
        }
        let at = aligned(rows);
        let (k, row_len, parts) = (self.k, self.row_len(), self.products.parts());
        let group = |(out, x): (&mut [u16], &[f32])| {
            for (out, row) in out.chunks_mut(row_len).zip(x.chunks(k)) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `available` checked AVX-512F/BW on this processor at load.
                unsafe {
                    split_row_avx512(row, out, parts)
                };
                #[cfg(not(target_arch = "x86_64"))]
                split_row(row, out, parts);
            }
        };
        let (out, x) = (&mut rows[at..at + m * row_len], &x[..m * k]);
        if pool {
            out.par_chunks_mut(TILE * row_len)
                .zip(x.par_chunks(TILE * k))
                .for_each(group);
        } else {
            group((out, x));
        }
        at
    }
}

/// bf16 values a unit of weights holds per step: 2 blocks × `parts` tiles.
fn unit_step(products: Products) -> usize {
    2 * products.parts() * TILE_VALUES
}

/// One row of `k` inputs into steps of 32 high bf16, then (`parts` = 2) 32 low ones,
/// zero past `k`.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn split_row(row: &[f32], out: &mut [u16], parts: usize) {
    for (s, step) in out.chunks_mut(parts * STEP).enumerate() {
        for j in 0..STEP {
            let (hi, lo) = row.get(s * STEP + j).map_or((0, 0), |&x| split(x));
            step[j] = hi;
            if parts == 2 {
                step[STEP + j] = lo;
            }
        }
    }
}

/// [`split_row`] with AVX-512, 16 inputs at a time (the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_row_avx512(row: &[f32], out: &mut [u16], parts: usize) {
    use std::arch::x86_64::*;
    let k = row.len();
    debug_assert!(out.len() >= k.div_ceil(STEP) * parts * STEP);
    let round = |b: __m512i| {
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        _mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)))
    };
    for s in 0..out.len() / (parts * STEP) {
        for half in 0..2 {
            let i = s * STEP + half * 16;
            let valid = k.saturating_sub(i).min(16);
            let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
            let x = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(i.min(k)));
            let hi = round(_mm512_castps_si512(x));
            let o = out.as_mut_ptr().add(s * parts * STEP + half * 16);
            _mm256_storeu_si256(o.cast(), _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hi)));
            if parts == 2 {
                let hi_f = _mm512_castsi512_ps(_mm512_and_si512(hi, _mm512_set1_epi32(-65536)));
                let lo = round(_mm512_castps_si512(_mm512_sub_ps(x, hi_f)));
                _mm256_storeu_si256(
                    o.add(STEP).cast(),
                    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(lo)),
                );
            }
        }
    }
}

thread_local! {
    /// A thread's split rows, reused across calls.
    static SROWS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

impl RowLinear for SplitLinear {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    fn units(&self) -> usize {
        self.units
    }
    fn weight_bytes(&self) -> usize {
        (self.packed.len() - LINE / 2) * 2
    }
    fn row_align(&self) -> usize {
        TILE
    }

    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, units: Range<usize>) {
        SROWS.with(|cell| {
            let rows = &mut *cell.borrow_mut();
            let at = self.split_rows(x, m, rows, false);
            self.tiles(&rows[at..], m, out, epi, units);
        });
    }

    /// Splits the rows once, then runs the parts over the pool from the shared rows.
    unsafe fn run_split(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, parts: usize) {
        // Taken out of the cell, not borrowed: while it waits for the parts, this thread
        // may run other tasks that split rows of their own.
        let mut rows = SROWS.with(|c| c.take());
        let at = self.split_rows(x, m, &mut rows, true);
        // SAFETY: each part writes the columns of its own units only.
        for_each_part(self.units, parts, out, |o, u| unsafe {
            self.tiles(&rows[at..], m, o, epi, u)
        });
        SROWS.with(|c| c.replace(rows));
    }
}

impl SplitLinear {
    /// The tiles of `units` over `m` split rows: rows in spans that stay in L2, in each
    /// span every unit, 32 rows × 32 channels a call.
    ///
    /// # Safety
    /// As [`RowLinear::run`]; `rows` holds `m` rows split by [`Self::split_rows`].
    unsafe fn tiles(
        &self,
        rows: &[u16],
        m: usize,
        out: *mut f32,
        epi: &Epilogue,
        units: Range<usize>,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let row_len = self.row_len();
            debug_assert!(rows.len() >= m.next_multiple_of(TILE) * row_len);
            let steps = self.kp / STEP;
            let span = (SPAN_BYTES / (row_len * 2)).max(TILE) / TILE * TILE;
            let weights = self.packed.as_ptr().add(self.at);
            let mut sums = [[0f32; ROWS * ROWS]; 4];
            amx::configure();
            let mut r0 = 0;
            while r0 < m {
                let r1 = (r0 + span).min(m);
                for g in units.clone() {
                    let w = weights.add(g * steps * unit_step(self.products));
                    let mut r = r0;
                    while r < r1 {
                        let n_rows = TILE.min(m - r);
                        let a = rows.as_ptr().add(r * row_len);
                        match self.products {
                            Products::Three => {
                                amx::tile_32x32_bf16x3(a, row_len * 2, w, steps, &mut sums)
                            }
                            Products::One => {
                                amx::tile_32x32_bf16(a, row_len * 2, w, steps, &mut sums)
                            }
                        }
                        finish(
                            self,
                            &sums,
                            g,
                            n_rows,
                            out.add(r * self.n),
                            epi.parts_at(r * self.n),
                        );
                        r += TILE;
                    }
                }
                r0 = r1;
            }
            amx::release();
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (rows, m, out, epi, units);
            unreachable!("the split kernel runs on x86-64 only");
        }
    }
}

/// The epilogue of one call: `rows` ≤ 32 rows of unit `g` (its second block skipped where
/// it is all padding), bias, GELU and residual.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn finish(
    lin: &SplitLinear,
    sums: &[[f32; 256]; 4],
    g: usize,
    rows: usize,
    out: *mut f32,
    (gelu, res): (bool, *const f32),
) {
    if gelu {
        finish_as::<true>(lin, sums, g, rows, out, res)
    } else {
        finish_as::<false>(lin, sums, g, rows, out, res)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn finish_as<const GELU: bool>(
    lin: &SplitLinear,
    sums: &[[f32; 256]; 4],
    g: usize,
    rows: usize,
    out: *mut f32,
    res: *const f32,
) {
    use std::arch::x86_64::*;
    for b in 0..2 {
        let c0 = g * TILE + b * ROWS;
        if c0 >= lin.n {
            break;
        }
        let valid = (lin.n - c0).min(ROWS);
        let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
        let bias = _mm512_loadu_ps(lin.bias.as_ptr().add(c0));
        for i in 0..rows {
            // Tiles 0, 1: rows 0–15 of blocks 0, 1; tiles 2, 3: rows 16–31.
            let sum = _mm512_loadu_ps(sums[i / ROWS * 2 + b][i % ROWS * ROWS..].as_ptr());
            let y = _mm512_add_ps(sum, bias);
            crate::embed::gemm::x86::gelu_residual_store(y, GELU, res, out, i * lin.n + c0, mask);
        }
    }
}

cpu_linear_op!(SplitLinear, "streambed-split-linear");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::gemm::tests::lcg;

    /// `Σ x·w` in f64, and `Σ |x·w|`: the scale the split's error is bounded by.
    fn exact(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<(f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for r in 0..m {
            for c in 0..n {
                let (mut s, mut a) = (b[c] as f64, b[c].abs() as f64);
                for i in 0..k {
                    let p = x[r * k + i] as f64 * w[c * k + i] as f64;
                    s += p;
                    a += p.abs();
                }
                out.push((s, a));
            }
        }
        out
    }

    #[test]
    fn the_split_keeps_sixteen_bits() {
        let mut seed = 7u64;
        for _ in 0..10_000 {
            let x = lcg(&mut seed) * 1000.0;
            let (hi, lo) = split(x);
            let back = f32::from_bits((hi as u32) << 16) + f32::from_bits((lo as u32) << 16);
            assert!((back - x).abs() <= x.abs() * 2f32.powi(-16), "{x} → {back}");
        }
        let row: Vec<f32> = (0..77).map(|_| lcg(&mut seed)).collect();
        for parts in [1, 2] {
            let (mut a, mut b) = (vec![0u16; 3 * 32 * parts], vec![1u16; 3 * 32 * parts]);
            split_row(&row, &mut a, parts);
            assert_eq!(a[0], split(row[0]).0);
            assert_eq!(
                a[32 * parts],
                split(row[32]).0,
                "step 1 starts after {parts} parts"
            );
            assert_eq!(a[3 * 32 * parts - 1], 0, "zero past k");
            if available() {
                // SAFETY: available() checked AVX-512F/BW.
                unsafe { split_row_avx512(&row, &mut b, parts) };
                assert_eq!(a, b, "the AVX-512 split gives the scalar split's bits");
            }
        }
    }

    /// Odd shapes (k not a whole step, n not a whole unit, m not a whole tile), every
    /// epilogue, within each scheme's bound of the exact product: three products within
    /// 2⁻¹⁵ of `Σ|x·w|` (far closer than bf16 alone, 2⁻⁸, could be), one within 2⁻⁷.
    #[test]
    fn matches_the_exact_product_to_sixteen_bits() {
        if !available() {
            eprintln!("skipped: this processor (or OS) gives no AMX-BF16");
            return;
        }
        for (products, bits) in [(Products::Three, -15), (Products::One, -7)] {
            within(products, bits);
        }
    }

    fn within(products: Products, bits: i32) {
        for &(m, n, k) in &[(1, 16, 4), (13, 50, 37), (33, 131, 96), (70, 768, 768)] {
            let mut seed = (m * 1000 + n * 10 + k) as u64;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
            let lin = SplitLinear::new(&w, &b, n, k, products);
            let want = exact(&x, &w, &b, m, n, k);
            for epi in [
                Epilogue::Bias,
                Epilogue::BiasGelu,
                Epilogue::BiasResidual(&res),
            ] {
                let got = par_forward(&lin, &x, m, &epi);
                for (i, (&g, &(s, scale))) in got.iter().zip(&want).enumerate() {
                    let y = match epi {
                        Epilogue::Bias => s,
                        Epilogue::BiasGelu => {
                            let t = s as f32;
                            (0.5 * t * (1.0 + erf(t / std::f32::consts::SQRT_2))) as f64
                        }
                        Epilogue::BiasResidual(r) => s + r[i] as f64,
                    };
                    let tol = scale * 2f64.powi(bits) + 1e-5 * (1.0 + y.abs());
                    assert!(
                        (g as f64 - y).abs() <= tol,
                        "{products:?} ({m},{n},{k}) out[{i}] = {g}, want {y} ± {tol}"
                    );
                }
            }
        }
    }

    fn erf(x: f32) -> f32 {
        // Abramowitz–Stegun 7.1.26 is too coarse at 1e-5; integrate instead.
        let steps = 2000;
        let h = x as f64 / steps as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x as f64);
        for i in 1..steps {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        (s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()) as f32
    }

    /// Split over the pool into any number of parts, the same bits as one call.
    #[test]
    fn split_runs_equal_one_run() {
        if !available() {
            eprintln!("skipped: this processor (or OS) gives no AMX-BF16");
            return;
        }
        let (m, n, k) = (45, 200, 3072);
        let mut seed = 3u64;
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.05).collect();
        let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        for products in [Products::Three, Products::One] {
            let lin = SplitLinear::new(&w, &b, n, k, products);
            let mut one = vec![0f32; m * n];
            // SAFETY: `one` holds m rows of n.
            unsafe { lin.run(&x, m, one.as_mut_ptr(), &Epilogue::BiasGelu, 0..lin.units()) };
            for parts in [1, 2, 3, 7] {
                let mut split = vec![0f32; m * n];
                // SAFETY: as above.
                unsafe { lin.run_split(&x, m, split.as_mut_ptr(), &Epilogue::BiasGelu, parts) };
                assert_eq!(one, split, "{products:?}, {parts} parts");
            }
        }
    }
}
