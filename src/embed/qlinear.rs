//! Int8 linear layers for the CPU (`model.dtype = "int8"`).
//!
//! Weights are quantized once, at load, per output channel (symmetric, scale = max|w| / 127).
//! Activations are quantized at every call, per row (symmetric, shifted by 128 so they fit
//! an unsigned byte). The products are summed in i32 by AVX512-VNNI `vpdpbusd` (64
//! multiply-adds per instruction, four times an f32 FMA's), and the epilogue turns each sum
//! back into f32 and adds the bias:
//!
//! `y[m][n] = sa[m] · sw[n] · (Σ_k qa[m][k]·qw[n][k] − 128 · Σ_k qw[n][k]) + bias[n]`
//!
//! where `qa = round(x / sa) + 128`. Weights are packed in blocks of 16 output channels,
//! four inputs at a time (`[block][k/4][16][4]`), so one 64-byte load feeds one
//! `vpdpbusd`. Processors without AVX512-VNNI run a portable loop over the same layout
//! (correct, slow). The quality cost is measured on KLUE-STS dev (docs/PERFORMANCE.md).

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

use super::gemm::{cpu_fwd_linear, par_forward, Epilogue, RowLinear};

/// Output channels per packed block: one 512-bit register of i32 sums.
const NB_COLS: usize = 16;
/// Rows of the activation per micro-tile (8 rows × 3 blocks = 24 accumulators).
const MR: usize = 8;
/// Blocks of 16 channels per micro-tile.
const NB: usize = 3;

/// A linear layer `y = x Wᵀ + b` with int8 weights.
pub struct QLinear {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
    blocks: usize,
    packed: Vec<i8>,
    /// Per output channel, padded to `blocks * 16`.
    scale: Vec<f32>,
    colsum: Vec<i32>,
    bias: Vec<f32>,
}

/// Whether this processor runs the int8 path at full speed (AVX512-VNNI).
pub fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl QLinear {
    /// `weight` is `(n, k)` row-major (PyTorch's `Linear.weight`), `bias` has `n` values.
    pub fn new(weight: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(weight.len(), n * k, "weight shape");
        assert_eq!(bias.len(), n, "bias shape");
        let kp = k.div_ceil(4) * 4;
        let blocks = n.div_ceil(NB_COLS);
        let np = blocks * NB_COLS;
        let k4 = kp / 4;
        let mut packed = vec![0i8; blocks * k4 * 64];
        let mut scale = vec![0f32; np];
        let mut colsum = vec![0i32; np];
        let mut padded_bias = vec![0f32; np];
        padded_bias[..n].copy_from_slice(bias);
        for c in 0..n {
            let row = &weight[c * k..(c + 1) * k];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scale[c] = s;
            let (blk, lane) = (c / NB_COLS, c % NB_COLS);
            let mut sum = 0i32;
            for (i, &w) in row.iter().enumerate() {
                // Round half away from zero without libm (baseline x86-64 has no
                // rounding instruction, and rintf per weight made loading slow).
                let r = w / s;
                let q = (r + 0.5f32.copysign(r)).clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                packed[(blk * k4 + i / 4) * 64 + lane * 4 + i % 4] = q;
            }
            colsum[c] = sum;
        }
        Self {
            n,
            k,
            kp,
            blocks,
            packed,
            scale,
            colsum,
            bias: padded_bias,
        }
    }

    /// `x` is `(m, k)` row-major; returns `(m, n)`, split over the thread pool.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        par_forward(self, x, m, &Epilogue::Bias)
    }

    /// Per-row scales and the rows as `round(x / s) + 128`, padded with 128 (zero) to `kp`.
    fn quantize_rows(&self, x: &[f32], m: usize, qa: &mut Vec<u8>, sa: &mut Vec<f32>) {
        // Grown, never cleared: every byte of the rows in use is written below.
        if qa.len() < m * self.kp {
            qa.resize(m * self.kp, 128);
        }
        sa.clear();
        sa.resize(m, 1.0);
        for ((q, s), row) in qa
            .chunks_mut(self.kp)
            .zip(sa.iter_mut())
            .zip(x.chunks(self.k).take(m))
        {
            q[self.k..].fill(128);
            quantize_row(row, &mut q[..self.k], s);
        }
    }

    /// Reference for processors without VNNI, and for the tests.
    ///
    /// # Safety
    /// `a` points at `sa.len()` rows of `kp` bytes; `out` at as many rows of `n` floats.
    unsafe fn portable_tile(
        &self,
        a: *const u8,
        sa: &[f32],
        blk0: usize,
        nb: usize,
        out: *mut f32,
        (gelu, res): (bool, *const f32),
    ) {
        let k4 = self.kp / 4;
        for (i, &s) in sa.iter().enumerate() {
            let row = std::slice::from_raw_parts(a.add(i * self.kp), self.kp);
            for blk in blk0..blk0 + nb {
                let b = &self.packed[blk * k4 * 64..(blk + 1) * k4 * 64];
                for lane in 0..NB_COLS {
                    let c = blk * NB_COLS + lane;
                    if c >= self.n {
                        break;
                    }
                    let mut acc = 0i32;
                    for kk in 0..k4 {
                        for t in 0..4 {
                            acc += row[kk * 4 + t] as i32 * b[kk * 64 + lane * 4 + t] as i32;
                        }
                    }
                    let v = (acc - 128 * self.colsum[c]) as f32;
                    let mut y = v * s * self.scale[c] + self.bias[c];
                    if gelu {
                        y = super::ops::gelu(y);
                    }
                    if !res.is_null() {
                        y += *res.add(i * self.n + c);
                    }
                    *out.add(i * self.n + c) = y;
                }
            }
        }
    }
}

thread_local! {
    /// A thread's quantized rows and their scales, reused across calls.
    static QROWS: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl RowLinear for QLinear {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    /// Groups of `NB` blocks of 16 channels (one micro-tile's width).
    fn units(&self) -> usize {
        self.blocks.div_ceil(NB)
    }

    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, units: Range<usize>) {
        let epi = match epi {
            Epilogue::Bias => (false, std::ptr::null()),
            Epilogue::BiasGelu => (true, std::ptr::null()),
            Epilogue::BiasResidual(r) => (false, r.as_ptr()),
        };
        let fast = vnni();
        QROWS.with(|cell| {
            let (qa, sa) = &mut *cell.borrow_mut();
            self.quantize_rows(x, m, qa, sa);
            for g in units {
                let blk0 = g * NB;
                let nb = NB.min(self.blocks - blk0);
                let mut r = 0;
                while r < m {
                    let mr = MR.min(m - r);
                    let a = qa.as_ptr().add(r * self.kp);
                    let o = out.add(r * self.n);
                    let e = (
                        epi.0,
                        if epi.1.is_null() {
                            epi.1
                        } else {
                            epi.1.add(r * self.n)
                        },
                    );
                    if fast {
                        #[cfg(target_arch = "x86_64")]
                        vnni_tile(self, a, &sa[r..r + mr], blk0, nb, o, e);
                    } else {
                        self.portable_tile(a, &sa[r..r + mr], blk0, nb, o, e);
                    }
                    r += mr;
                }
            }
        });
    }
}

fn quantize_row(row: &[f32], q: &mut [u8], s: &mut f32) {
    #[cfg(target_arch = "x86_64")]
    if vnni() {
        // SAFETY: the features were detected on this processor.
        return unsafe { quantize_row_avx512(row, q, s) };
    }
    quantize_row_loop(row, q, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(row: &[f32], q: &mut [u8], s: &mut f32) {
    use std::arch::x86_64::*;
    let whole = row.len() / 16 * 16;
    let p = row.as_ptr();
    let mut vmax = _mm512_setzero_ps();
    for i in (0..whole).step_by(16) {
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(p.add(i))));
    }
    let amax = row[whole..]
        .iter()
        .fold(_mm512_reduce_max_ps(vmax), |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        q.fill(128);
        *s = 1.0;
        return;
    }
    *s = amax / 127.0;
    let inv = 127.0 / amax;
    let (vinv, half) = (_mm512_set1_ps(inv), _mm512_set1_ps(128.5));
    let d = q.as_mut_ptr();
    for i in (0..whole).step_by(16) {
        let v = _mm512_fmadd_ps(_mm512_loadu_ps(p.add(i)), vinv, half);
        _mm_storeu_si128(
            d.add(i).cast(),
            _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)),
        );
    }
    for i in whole..row.len() {
        q[i] = (row[i] * inv + 128.5) as i32 as u8;
    }
}

#[inline(always)]
fn quantize_row_loop(row: &[f32], q: &mut [u8], s: &mut f32) {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        // All zeros (or a NaN/inf row, which would poison the scale): zeros (128).
        q.fill(128);
        *s = 1.0;
        return;
    }
    *s = amax / 127.0;
    let inv = 127.0 / amax;
    for (d, &v) in q.iter_mut().zip(row) {
        // v·inv + 128 lies in [1, 255]; adding 0.5 and truncating rounds it (half up)
        // without a libm call, so the loop vectorises.
        *d = (v * inv + 128.5) as i32 as u8;
    }
}

/// Dispatches to the micro-kernel for this tile's shape (`sa.len()` rows ≤ MR, `nb` ≤ NB).
#[cfg(target_arch = "x86_64")]
unsafe fn vnni_tile(
    q: &QLinear,
    a: *const u8,
    sa: &[f32],
    blk0: usize,
    nb: usize,
    out: *mut f32,
    epi: (bool, *const f32),
) {
    macro_rules! rows {
        ($nb:literal) => {
            match sa.len() {
                8 => tile::<8, $nb>(q, a, sa, blk0, out, epi),
                7 => tile::<7, $nb>(q, a, sa, blk0, out, epi),
                6 => tile::<6, $nb>(q, a, sa, blk0, out, epi),
                5 => tile::<5, $nb>(q, a, sa, blk0, out, epi),
                4 => tile::<4, $nb>(q, a, sa, blk0, out, epi),
                3 => tile::<3, $nb>(q, a, sa, blk0, out, epi),
                2 => tile::<2, $nb>(q, a, sa, blk0, out, epi),
                1 => tile::<1, $nb>(q, a, sa, blk0, out, epi),
                _ => unreachable!("tile rows"),
            }
        };
    }
    match nb {
        3 => rows!(3),
        2 => rows!(2),
        1 => rows!(1),
        _ => unreachable!("tile blocks"),
    }
}

/// `R` rows × `B` blocks of 16 channels: `R·B` accumulators live in registers for the
/// whole `k` loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const B: usize>(
    q: &QLinear,
    a: *const u8,
    sa: &[f32],
    blk0: usize,
    out: *mut f32,
    (gelu, res): (bool, *const f32),
) {
    use std::arch::x86_64::*;
    let k4 = q.kp / 4;
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    let w = q.packed.as_ptr();
    for kk in 0..k4 {
        let mut bv = [_mm512_setzero_si512(); B];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(w.add(((blk0 + j) * k4 + kk) * 64).cast());
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_epi32(a.add(i * q.kp + kk * 4).cast::<i32>().read_unaligned());
            for (c, v) in row.iter_mut().zip(&bv) {
                *c = _mm512_dpbusd_epi32(*c, av, *v);
            }
        }
    }
    // Constant indices only (see `gemm::x86::k512`): a loop index into `acc` would keep
    // the accumulators in memory, stored at every `k` step. The rows are spelled out
    // too: a loop over them (not unrolled, the epilogue is long) kept `acc` in memory
    // outside the `k` loop, zeroed by a memset and reloaded for every tile (2% of the
    // int8 forward pass).
    macro_rules! rows {
        ($($i:literal)*) => {$(
            if let Some(row) = acc.get($i) {
                if let Some(&v) = row.first() {
                    finish(q, v, blk0, $i, sa[$i], out, (gelu, res));
                }
                if let Some(&v) = row.get(1) {
                    finish(q, v, blk0 + 1, $i, sa[$i], out, (gelu, res));
                }
                if let Some(&v) = row.get(2) {
                    finish(q, v, blk0 + 2, $i, sa[$i], out, (gelu, res));
                }
            }
        )*};
    }
    const _: () = assert!(MR == 8, "rows! spells out MR rows");
    rows!(0 1 2 3 4 5 6 7);
}

/// Row `i` of block `blk`'s 16 sums to outputs: scales, bias, GELU, residual, store.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn finish(
    q: &QLinear,
    acc: std::arch::x86_64::__m512i,
    blk: usize,
    i: usize,
    sa: f32,
    out: *mut f32,
    (gelu, res): (bool, *const f32),
) {
    use std::arch::x86_64::*;
    let c0 = blk * NB_COLS;
    let valid = q.n.saturating_sub(c0).min(NB_COLS);
    let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
    let zero_point = _mm512_slli_epi32::<7>(_mm512_loadu_si512(q.colsum.as_ptr().add(c0).cast()));
    let sw = _mm512_loadu_ps(q.scale.as_ptr().add(c0));
    let bias = _mm512_loadu_ps(q.bias.as_ptr().add(c0));
    let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, zero_point));
    let mut y = _mm512_fmadd_ps(sum, _mm512_mul_ps(_mm512_set1_ps(sa), sw), bias);
    if gelu {
        y = crate::embed::gemm::x86::gelu512(y);
    }
    let at = i * q.n + c0;
    if !res.is_null() {
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, res.add(at)));
    }
    _mm512_mask_storeu_ps(out.add(at), mask, y);
}

/// candle op: `x (.., k)` f32 contiguous on CPU → `(.., n)`.
impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "streambed-int8-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_fwd_linear(self, self.name(), storage, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::gemm::tests::{lcg, reference};

    /// Odd shapes (k not a multiple of 4, n not of 16, m not of 8) exercise every edge.
    #[test]
    fn matches_f32_within_quantization_error() {
        for &(m, n, k) in &[(1, 16, 4), (13, 50, 37), (70, 131, 96), (9, 768, 384)] {
            let mut seed = (m * 1000 + n * 10 + k) as u64;
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let q = QLinear::new(&w, &b, n, k);
            let want = reference(&x, &w, &b, m, n, k);
            let got = q.forward(&x, m);
            // Error bound: each product errs by about half a step of either factor.
            let tol = 0.1 * (k as f32).sqrt() * 2.0 / 127.0;
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                let r = *r as f32;
                assert!((g - r).abs() < tol, "{m}x{n}x{k} at {i}: {g} vs {r}");
            }
        }
    }

    /// The fast kernel and the portable loop compute the same integers.
    #[test]
    fn vnni_kernel_equals_portable_loop() {
        if !vnni() {
            eprintln!("SKIPPED vnni_kernel_equals_portable_loop: this CPU lacks AVX512-VNNI, so the fast kernel cannot run here");
            return;
        }
        let (m, n, k) = (21, 100, 44);
        let mut seed = 7;
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let q = QLinear::new(&w, &b, n, k);
        let fast = q.forward(&x, m);
        let (mut qa, mut sa) = (Vec::new(), Vec::new());
        q.quantize_rows(&x, m, &mut qa, &mut sa);
        let mut slow = vec![0f32; m * n];
        for r in 0..m {
            for g in 0..q.blocks.div_ceil(NB) {
                let nb = NB.min(q.blocks - g * NB);
                // SAFETY: row r of qa, row r of slow.
                unsafe {
                    q.portable_tile(
                        qa.as_ptr().add(r * q.kp),
                        &sa[r..r + 1],
                        g * NB,
                        nb,
                        slow.as_mut_ptr().add(r * n),
                        (false, std::ptr::null()),
                    );
                }
            }
        }
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn zero_rows_give_the_bias() {
        let q = QLinear::new(&[0.5; 32], &[1.0, -2.0], 2, 16);
        let y = q.forward(&[0.0; 16], 1);
        assert_eq!(y, vec![1.0, -2.0]);
        // Also right after other rows on this thread (the quantized-row buffer is reused
        // without clearing), and for a row that is not finite.
        let mut out = [0f32; 2];
        for x in [[3.0f32; 16], [0.0; 16], [f32::NAN; 16], [0.0; 16]] {
            // SAFETY: one row of 16 in, one row of 2 out.
            unsafe { q.run(&x, 1, out.as_mut_ptr(), &Epilogue::Bias, 0..q.units()) };
        }
        assert_eq!(out, [1.0, -2.0]);
    }
}
