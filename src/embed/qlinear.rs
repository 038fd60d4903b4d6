//! Int8 linear layers for the CPU (`model.dtype = "int8"`).
//!
//! Weights are quantized once, at load, per output channel (symmetric, scale = max|w| / 127).
//! Activations are quantized at every call, per row (symmetric, to ±127). The products are
//! summed in i32 and the epilogue turns each sum back into f32 and adds the bias:
//!
//! `y[m][n] = sa[m] · sw[n] · Σ_k qa[m][k]·qw[n][k] + bias[n]`
//!
//! Three kernels, chosen at load by what the processor has, compute the same integers:
//!
//! - AMX (Intel Xeon with `amx_tile`/`amx_int8`, where Linux grants the tile state):
//!   `tdpbusd` on 16 × 64-byte tiles (`amx`), over the VNNI layout below with `k` padded
//!   to 64 and `n` to 32; the epilogue is the VNNI kernel's, row by row.
//! - AVX512-VNNI: `vpdpbusd` (64 multiply-adds per instruction, four times an f32 FMA's)
//!   wants one operand unsigned, so the rows are shifted by 128 (`qa + 128`) and
//!   `128 · Σ_k qw[n][k]` is taken off in the epilogue. Weights are packed in blocks of 16
//!   channels, four inputs at a time (`[block][k/4][16][4]`): one 64-byte load feeds one
//!   `vpdpbusd`.
//! - AVX2: `vpmaddwd` on 16-bit values (16 multiply-adds per instruction, twice an f32
//!   FMA's on AMD EPYC Zen 3), the rows kept as i16 and the weights sign-extended as they
//!   are loaded, from blocks of 8 channels two inputs at a time (`[block][k/2][8][2]`).
//!   (`vpmaddubsw`, which ONNX Runtime uses there, sums two u8·i8 products into an i16 that
//!   saturates for large values; this one never does. `vpmaddubsw` with weights cut to 7
//!   bits, so that it cannot saturate, was 12% faster end to end on BERT-base and kept
//!   e5-small's STS scores, whose weights were 4-bit to begin with, but moved
//!   all-MiniLM-L6-v2's reference pair by 0.012: too coarse for full-precision weights.)
//!
//! Other processors run a portable loop over either layout (correct, slow). The quality
//! cost is measured on KLUE-STS dev (docs/PERFORMANCE.md).

use std::cell::RefCell;
use std::ops::Range;

use super::amx::{aligned, LINE};
use super::gemm::{cpu_linear_op, for_each_part, par_forward, Epilogue, RowLinear};

/// Output channels per packed block: one 512-bit register of i32 sums.
const NB_COLS: usize = 16;
/// Rows of the activation per micro-tile (8 rows × 3 blocks = 24 accumulators).
const MR: usize = 8;
/// Blocks of 16 channels per micro-tile.
const NB: usize = 3;
/// The AVX2 kernel's blocks (8 channels, one 256-bit register of sums), its rows per
/// micro-tile and its blocks per tile (6 × 2 = 12 accumulators, as the f32 AVX2 kernel).
const NB_COLS_256: usize = 8;
const MR_256: usize = 6;
const NB_256: usize = 2;

/// Which kernel a layer was packed for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    Amx,
    Vnni,
    Avx2,
    /// The portable loop, over the VNNI layout.
    Portable,
}

impl Kernel {
    /// The best this processor runs, or the one `STREAMBED_INT8_KERNEL` names (`amx`,
    /// `vnni`, `avx2`, `portable`) if the processor runs it: for comparing kernels on
    /// one machine. Detected once.
    pub fn detect() -> Self {
        static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            super::gemm::pick_by_env("STREAMBED_INT8_KERNEL", &Self::supported(), Kernel::name)
        })
    }

    /// The kernels this processor runs, best first.
    pub fn supported() -> Vec<Kernel> {
        let mut runs = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                if super::amx::available() {
                    runs.push(Kernel::Amx);
                }
                runs.push(Kernel::Vnni);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                runs.push(Kernel::Avx2);
            }
        }
        runs.push(Kernel::Portable);
        runs
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Vnni => "vnni",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// Whether rows are quantised by the AVX-512 loop (the kernels on the VNNI layout).
    fn avx512(self) -> bool {
        matches!(self, Kernel::Amx | Kernel::Vnni)
    }

    /// Inputs per channel are padded to a multiple of this.
    fn k_align(self) -> usize {
        match self {
            Kernel::Amx => super::amx::K_STEP,
            _ => 4,
        }
    }

    /// Rows the quantised rows are padded to a multiple of (AMX reads whole tiles).
    fn row_align(self) -> usize {
        match self {
            Kernel::Amx => super::amx::TILE,
            _ => 1,
        }
    }

    /// Channels per packed block.
    fn block(self) -> usize {
        match self {
            Kernel::Avx2 => NB_COLS_256,
            _ => NB_COLS,
        }
    }

    /// Channels per column unit (one micro-tile's width).
    fn unit(self) -> usize {
        match self {
            Kernel::Avx2 => NB_COLS_256 * NB_256,
            Kernel::Amx => super::amx::TILE,
            _ => NB_COLS * NB,
        }
    }
}

/// A linear layer `y = x Wᵀ + b` with int8 weights.
pub struct QLinear {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4 (of 64 for AMX).
    kp: usize,
    kernel: Kernel,
    /// The packed weights start at `packed[at]`, on a 64-byte line (see [`aligned`]).
    packed: Vec<i8>,
    at: usize,
    /// Per output channel, padded to whole blocks.
    scale: Vec<f32>,
    /// `Σ_k qw[n][k]`, for the VNNI kernel's shifted rows.
    colsum: Vec<i32>,
    bias: Vec<f32>,
}

/// Whether this processor runs the int8 path faster than f32 (AMX, AVX512-VNNI or AVX2).
pub fn fast() -> bool {
    Kernel::detect() != Kernel::Portable
}

impl QLinear {
    /// `weight` is `(n, k)` row-major (PyTorch's `Linear.weight`), `bias` has `n` values.
    pub fn new(weight: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        Self::with_kernel(weight, bias, n, k, Kernel::detect())
    }

    pub fn with_kernel(weight: &[f32], bias: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        assert_eq!(weight.len(), n * k, "weight shape");
        assert_eq!(bias.len(), n, "bias shape");
        let kp = k.div_ceil(kernel.k_align()) * kernel.k_align();
        // Whole units: AMX computes two blocks at a time (the second may be padding).
        let pad_n = if kernel == Kernel::Amx {
            kernel.unit()
        } else {
            kernel.block()
        };
        let np = n.div_ceil(pad_n) * pad_n;
        let mut packed = vec![0i8; np * kp + LINE];
        let at = aligned(&packed);
        let mut scale = vec![0f32; np];
        let mut colsum = vec![0i32; np];
        let mut padded_bias = vec![0f32; np];
        padded_bias[..n].copy_from_slice(bias);
        for c in 0..n {
            let row = &weight[c * k..(c + 1) * k];
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            scale[c] = s;
            let mut sum = 0i32;
            for (i, &w) in row.iter().enumerate() {
                // Round half away from zero without libm (baseline x86-64 has no
                // rounding instruction, and rintf per weight made loading slow).
                let r = w / s;
                let q = (r + 0.5f32.copysign(r)).clamp(-127.0, 127.0) as i8;
                sum += q as i32;
                packed[at + weight_at(kernel, kp, c, i)] = q;
            }
            colsum[c] = sum;
        }
        Self {
            n,
            k,
            kp,
            kernel,
            packed,
            at,
            scale,
            colsum,
            bias: padded_bias,
        }
    }

    /// The packed weights.
    fn weights(&self) -> &[i8] {
        &self.packed[self.at..]
    }

    /// `x` is `(m, k)` row-major; returns `(m, n)`, split over the thread pool.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        par_forward(self, x, m, &Epilogue::Bias)
    }

    /// Per-row scales and the rows as `round(x / s) + 128`, padded with 128 (zero) to `kp`,
    /// from `qa[at]` (returned) on a 64-byte line.
    fn quantize_rows(&self, x: &[f32], m: usize, qa: &mut Vec<u8>, sa: &mut Vec<f32>) -> usize {
        self.quantize_rows_as(x, m, qa, sa, 128, quantize_row)
    }

    /// The rows as `round(x / s)` in i16 (the same integers as [`Self::quantize_rows`],
    /// unshifted), padded with zeros to `kp`.
    fn quantize_rows_i16(
        &self,
        x: &[f32],
        m: usize,
        qa: &mut Vec<i16>,
        sa: &mut Vec<f32>,
    ) -> usize {
        self.quantize_rows_as(x, m, qa, sa, 0, quantize_row_i16)
    }

    /// Per-row scales, and each row quantized by `row_fn` into `kp` values, the last
    /// `kp - k` of them `zero`, from `qa[at]` (returned), on a 64-byte line.
    fn quantize_rows_as<T: Copy>(
        &self,
        x: &[f32],
        m: usize,
        qa: &mut Vec<T>,
        sa: &mut Vec<f32>,
        zero: T,
        row_fn: fn(&[f32], &mut [T], &mut f32),
    ) -> usize {
        // Grown, never cleared: every value of the rows in use is written below. AMX
        // reads whole tiles of rows: the rows past `m` are read (whatever they hold) and
        // their sums never stored.
        let rows = m.next_multiple_of(self.kernel.row_align());
        let len = rows * self.kp + LINE / std::mem::size_of::<T>();
        if qa.len() < len {
            qa.resize(len, zero);
        }
        let at = aligned(qa);
        sa.clear();
        sa.resize(m, 1.0);
        for ((q, s), row) in qa[at..]
            .chunks_mut(self.kp)
            .zip(sa.iter_mut())
            .zip(x.chunks(self.k).take(m))
        {
            q[self.k..].fill(zero);
            row_fn(row, &mut q[..self.k], s);
        }
        at
    }

    /// Reference for processors without a fast kernel, and for the tests: columns `cols`
    /// of `sa.len()` rows, from the shifted rows of [`Self::quantize_rows`], whichever
    /// layout the weights are packed in.
    ///
    /// # Safety
    /// `a` points at `sa.len()` rows of `kp` bytes; `out` at as many rows of `n` floats.
    unsafe fn portable_tile(
        &self,
        a: *const u8,
        sa: &[f32],
        cols: Range<usize>,
        out: *mut f32,
        (gelu, res): (bool, *const f32),
    ) {
        for (i, &s) in sa.iter().enumerate() {
            let row = std::slice::from_raw_parts(a.add(i * self.kp), self.k);
            for c in cols.clone() {
                let mut acc = 0i32;
                for (t, &v) in row.iter().enumerate() {
                    acc += v as i32 * self.weights()[weight_at(self.kernel, self.kp, c, t)] as i32;
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

/// Where weight `(c, i)` lies in a layer packed for `kernel` (`kp` inputs per channel).
#[inline(always)]
fn weight_at(kernel: Kernel, kp: usize, c: usize, i: usize) -> usize {
    match kernel {
        // [block][k/2][8][2]
        Kernel::Avx2 => {
            let (blk, lane) = (c / NB_COLS_256, c % NB_COLS_256);
            (blk * kp / 2 + i / 2) * 2 * NB_COLS_256 + lane * 2 + i % 2
        }
        // [block][k/4][16][4]
        _ => {
            let (blk, lane) = (c / NB_COLS, c % NB_COLS);
            (blk * kp / 4 + i / 4) * 4 * NB_COLS + lane * 4 + i % 4
        }
    }
}

thread_local! {
    /// A thread's quantized rows and their scales, reused across calls.
    static QROWS: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    static QROWS16: RefCell<(Vec<i16>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl RowLinear for QLinear {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    /// One micro-tile's width of channels each.
    fn units(&self) -> usize {
        self.n.div_ceil(self.kernel.unit())
    }
    fn weight_bytes(&self) -> usize {
        self.packed.len() - LINE
    }
    fn row_align(&self) -> usize {
        self.kernel.row_align()
    }

    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, units: Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx2 {
            return QROWS16.with(|cell| {
                let (qa, sa) = &mut *cell.borrow_mut();
                let at = self.quantize_rows_i16(x, m, qa, sa);
                self.tiles_i16(&qa[at..], sa, out, epi, units);
            });
        }
        QROWS.with(|cell| {
            let (qa, sa) = &mut *cell.borrow_mut();
            let at = self.quantize_rows(x, m, qa, sa);
            self.tiles_u8(&qa[at..], sa, out, epi, units);
        });
    }

    /// Quantises the rows once, then runs the parts over the pool from the shared rows
    /// (the default would quantise all of them again in every part).
    unsafe fn run_split(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, parts: usize) {
        let units = self.units();
        // Taken out of the cell, not borrowed: while it waits for the parts, this thread
        // may run other tasks that quantise rows of their own.
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx2 {
            let (mut qa, mut sa) = QROWS16.with(|c| c.take());
            let at = self.quantize_rows_i16(x, m, &mut qa, &mut sa);
            // SAFETY: each part writes the columns of its own units only.
            for_each_part(units, parts, out, |o, u| unsafe {
                self.tiles_i16(&qa[at..], &sa, o, epi, u)
            });
            QROWS16.with(|c| c.replace((qa, sa)));
            return;
        }
        let (mut qa, mut sa) = QROWS.with(|c| c.take());
        let at = self.quantize_rows(x, m, &mut qa, &mut sa);
        // SAFETY: as above.
        for_each_part(units, parts, out, |o, u| unsafe {
            self.tiles_u8(&qa[at..], &sa, o, epi, u)
        });
        QROWS.with(|c| c.replace((qa, sa)));
    }
}

impl QLinear {
    /// The AVX2 kernel's tiles for `units`, over the `sa.len()` rows of `qa` (quantised
    /// by [`Self::quantize_rows_i16`]).
    ///
    /// # Safety
    /// As [`RowLinear::run`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles_i16(
        &self,
        qa: &[i16],
        sa: &[f32],
        out: *mut f32,
        epi: &Epilogue,
        units: Range<usize>,
    ) {
        let m = sa.len();
        let blocks = self.n.div_ceil(NB_COLS_256);
        for g in units {
            let blk0 = g * NB_256;
            let nb = NB_256.min(blocks - blk0);
            let mut r = 0;
            while r < m {
                let mr = MR_256.min(m - r);
                let a = qa.as_ptr().add(r * self.kp);
                avx2::tile(
                    self,
                    a,
                    &sa[r..r + mr],
                    blk0,
                    nb,
                    out.add(r * self.n),
                    epi.parts_at(r * self.n),
                );
                r += mr;
            }
        }
    }

    /// Where row tile number `tile` over column group `blk0` asks for the next group's
    /// weights, a line a `k` step (`prefetcht1`): the first `NB` tiles each bring one of
    /// the next group's blocks into L2 while they multiply; later tiles, and a range's
    /// last group (the next range may run on the other core), ask for their own first
    /// block, in L1 already. As the f32 tiles' next panel (`gemm::next_panel_ahead`): the
    /// in-group prefetch (2 KiB ahead) left each group's first tile reading its weights
    /// from L3 or memory. Intel Xeon, AMX denied (VNNI), interleaved processes: BERT-base
    /// int8 333.5/340.0/333.0/346.4 → 345.8/362.1/340.7/366.9 sent/s (+2–7%, 4 of 4),
    /// e5-small 974.5/1,022.3/976.1/1,002.5 → 951.0/1,029.7/1,013.4/1,013.8 (−2 to +4%).
    /// The AVX2 kernel with the same (`STREAMBED_INT8_KERNEL=avx2`, same Intel):
    /// BERT-base 85.0/85.5/85.5/85.7 → 86.2/85.8/87.1/86.1, e5-small 321.3/319.0/316.0 →
    /// 316.7/314.1/312.3 (−1.2 to −1.5%, 3 of 3): not kept there.
    #[cfg(target_arch = "x86_64")]
    fn next_group_ahead(&self, blk0: usize, next: bool, tile: usize) -> *const i8 {
        let per_group = self.kernel.unit() / self.kernel.block();
        let blk = if next && tile < per_group {
            blk0 + per_group + tile
        } else {
            blk0
        };
        // A block is `block()` channels of `kp` bytes.
        self.weights()
            .as_ptr()
            .wrapping_add(blk * self.kp * self.kernel.block())
    }

    /// The VNNI kernel's tiles (or the portable loop's) for `units`, over the `sa.len()`
    /// rows of `qa` (quantised by [`Self::quantize_rows`]).
    ///
    /// # Safety
    /// As [`RowLinear::run`].
    unsafe fn tiles_u8(
        &self,
        qa: &[u8],
        sa: &[f32],
        out: *mut f32,
        epi: &Epilogue,
        units: Range<usize>,
    ) {
        let m = sa.len();
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Amx {
            return self.tiles_amx(qa, sa, out, epi, units);
        }
        let fast = self.kernel == Kernel::Vnni;
        for g in units.clone() {
            let blk0 = g * NB;
            let nb = NB.min(self.n.div_ceil(NB_COLS) - blk0);
            let mut r = 0;
            while r < m {
                let mr = MR.min(m - r);
                let a = qa.as_ptr().add(r * self.kp);
                let o = out.add(r * self.n);
                let epi = epi.parts_at(r * self.n);
                if fast {
                    #[cfg(target_arch = "x86_64")]
                    {
                        let ahead = self.next_group_ahead(blk0, g + 1 < units.end, r / MR);
                        vnni_tile(self, a, &sa[r..r + mr], blk0, nb, o, epi, ahead);
                    }
                } else {
                    let cols = blk0 * NB_COLS..((blk0 + nb) * NB_COLS).min(self.n);
                    self.portable_tile(a, &sa[r..r + mr], cols, o, epi);
                }
                r += mr;
            }
        }
    }
}

/// Bytes of quantised rows the AMX kernel keeps in L2 while every unit's weights pass
/// over them (a span of rows, a multiple of 32).
const AMX_SPAN_BYTES: usize = 256 << 10;

#[cfg(target_arch = "x86_64")]
impl QLinear {
    /// The AMX kernel's tiles for `units`, over the `sa.len()` rows of `qa` (quantised by
    /// [`Self::quantize_rows`], padded to whole tiles): rows in spans that stay in L2,
    /// in each span every unit, 32 rows × 32 channels a call.
    ///
    /// # Safety
    /// As [`RowLinear::run`]; this processor runs AMX ([`Kernel::supported`]).
    unsafe fn tiles_amx(
        &self,
        qa: &[u8],
        sa: &[f32],
        out: *mut f32,
        epi: &Epilogue,
        units: Range<usize>,
    ) {
        use super::amx::{self, TILE};
        let m = sa.len();
        debug_assert!(qa.len() >= m.next_multiple_of(TILE) * self.kp);
        let k_steps = self.kp / amx::K_STEP;
        // One block of 16 channels: kp/4 rows of 64 bytes.
        let block_bytes = self.kp * NB_COLS;
        let span = (AMX_SPAN_BYTES / self.kp).max(TILE) / TILE * TILE;
        let mut sums = [[0i32; amx::ROWS * amx::ROWS]; 4];
        amx::configure();
        let mut r0 = 0;
        while r0 < m {
            let r1 = (r0 + span).min(m);
            for g in units.clone() {
                let blk0 = 2 * g;
                let w0 = self.weights().as_ptr().add(blk0 * block_bytes);
                let mut r = r0;
                while r < r1 {
                    let rows = TILE.min(m - r);
                    amx::tile_32x32(
                        qa.as_ptr().add(r * self.kp),
                        self.kp,
                        w0,
                        w0.add(block_bytes),
                        k_steps,
                        &mut sums,
                    );
                    amx_finish(
                        self,
                        &sums,
                        blk0,
                        &sa[r..r + rows],
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
}

/// The epilogue of one AMX call: `sa.len()` ≤ 32 rows of the two blocks from `blk0`
/// (the second skipped where it is all padding). The VNNI kernel's [`finish`], with a
/// block's constants loaded once for its rows (12% of the int8 pass when per row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn amx_finish(
    q: &QLinear,
    sums: &[[i32; 256]; 4],
    blk0: usize,
    sa: &[f32],
    out: *mut f32,
    (gelu, res): (bool, *const f32),
) {
    if gelu {
        amx_finish_as::<true>(q, sums, blk0, sa, out, res)
    } else {
        amx_finish_as::<false>(q, sums, blk0, sa, out, res)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn amx_finish_as<const GELU: bool>(
    q: &QLinear,
    sums: &[[i32; 256]; 4],
    blk0: usize,
    sa: &[f32],
    out: *mut f32,
    res: *const f32,
) {
    use std::arch::x86_64::*;
    for b in 0..2 {
        let c0 = (blk0 + b) * NB_COLS;
        if c0 >= q.n {
            break;
        }
        let valid = (q.n - c0).min(NB_COLS);
        let mask: __mmask16 = ((1u32 << valid) - 1) as __mmask16;
        let zero_point =
            _mm512_slli_epi32::<7>(_mm512_loadu_si512(q.colsum.as_ptr().add(c0).cast()));
        let sw = _mm512_loadu_ps(q.scale.as_ptr().add(c0));
        let bias = _mm512_loadu_ps(q.bias.as_ptr().add(c0));
        for (i, &s) in sa.iter().enumerate() {
            // Tiles 0, 1: rows 0–15 of blocks 0, 1; tiles 2, 3: rows 16–31.
            let acc = _mm512_loadu_si512(sums[i / 16 * 2 + b][i % 16 * 16..].as_ptr().cast());
            let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, zero_point));
            let y = _mm512_fmadd_ps(sum, _mm512_mul_ps(_mm512_set1_ps(s), sw), bias);
            crate::embed::gemm::x86::gelu_residual_store(y, GELU, res, out, i * q.n + c0, mask);
        }
    }
}

fn quantize_row(row: &[f32], q: &mut [u8], s: &mut f32) {
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect().avx512() {
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

fn quantize_row_i16(row: &[f32], q: &mut [i16], s: &mut f32) {
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect() == Kernel::Avx2 {
        // SAFETY: the features were detected on this processor.
        return unsafe { avx2::quantize_row(row, q, s) };
    }
    let mut u = vec![0u8; row.len()];
    quantize_row_loop(row, &mut u, s);
    for (d, &v) in q.iter_mut().zip(&u) {
        *d = v as i16 - 128;
    }
}

/// The AVX2 kernel (see the module's doc).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QLinear, MR_256, NB_256, NB_COLS_256};
    use crate::embed::gemm::x86::{gelu256, lane_mask, load8, store8};
    use std::arch::x86_64::*;

    /// [`super::quantize_row_loop`]'s integers, unshifted, in i16.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_row(row: &[f32], q: &mut [i16], s: &mut f32) {
        let whole = row.len() / 16 * 16;
        let p = row.as_ptr();
        let sign = _mm256_set1_ps(-0.0);
        let (mut vmax, mut nan) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..whole).step_by(8) {
            let v = _mm256_loadu_ps(p.add(i));
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let amax = lanes
            .iter()
            .chain(&row[whole..])
            .fold(0f32, |m, v| m.max(v.abs()));
        let nan = _mm256_movemask_ps(nan) != 0 || row[whole..].iter().any(|v| v.is_nan());
        if amax == 0.0 || !amax.is_finite() || nan {
            q.fill(0);
            *s = 1.0;
            return;
        }
        *s = amax / 127.0;
        let inv = 127.0 / amax;
        let (vinv, half, shift) = (
            _mm256_set1_ps(inv),
            _mm256_set1_ps(128.5),
            _mm256_set1_epi32(128),
        );
        let d = q.as_mut_ptr();
        for i in (0..whole).step_by(16) {
            // v·inv + 128.5 truncated is the VNNI path's byte; less 128, its value.
            let lo = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), vinv, half);
            let hi = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(i + 8)), vinv, half);
            let lo = _mm256_sub_epi32(_mm256_cvttps_epi32(lo), shift);
            let hi = _mm256_sub_epi32(_mm256_cvttps_epi32(hi), shift);
            // packs interleaves the 128-bit halves; the permute puts them back in order.
            let v = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(lo, hi));
            _mm256_storeu_si256(d.add(i).cast(), v);
        }
        for i in whole..row.len() {
            q[i] = (row[i] * inv + 128.5) as i32 as i16 - 128;
        }
    }

    /// `sa.len()` rows (≤ MR_256) × `nb` blocks (≤ NB_256) from block `blk0`.
    pub(super) unsafe fn tile(
        q: &QLinear,
        a: *const i16,
        sa: &[f32],
        blk0: usize,
        nb: usize,
        out: *mut f32,
        epi: (bool, *const f32),
    ) {
        macro_rules! rows {
            ($nb:literal) => {
                match sa.len() {
                    6 => k::<6, $nb>(q, a, sa, blk0, out, epi),
                    5 => k::<5, $nb>(q, a, sa, blk0, out, epi),
                    4 => k::<4, $nb>(q, a, sa, blk0, out, epi),
                    3 => k::<3, $nb>(q, a, sa, blk0, out, epi),
                    2 => k::<2, $nb>(q, a, sa, blk0, out, epi),
                    1 => k::<1, $nb>(q, a, sa, blk0, out, epi),
                    _ => unreachable!("tile rows"),
                }
            };
        }
        const _: () = assert!(MR_256 == 6 && NB_256 == 2, "tile spells out its shapes");
        match nb {
            2 => rows!(2),
            1 => rows!(1),
            _ => unreachable!("tile blocks"),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn k<const R: usize, const B: usize>(
        q: &QLinear,
        a: *const i16,
        sa: &[f32],
        blk0: usize,
        out: *mut f32,
        epi: (bool, *const f32),
    ) {
        let k2 = q.kp / 2;
        let mut acc = [[_mm256_setzero_si256(); B]; R];
        let w = q.weights().as_ptr();
        for t in 0..k2 {
            let mut bv = [_mm256_setzero_si256(); B];
            for (j, v) in bv.iter_mut().enumerate() {
                let at = ((blk0 + j) * k2 + t) * 2 * NB_COLS_256;
                *v = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.add(at).cast()));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // Inputs 2t and 2t+1 of row i, in every 32-bit lane.
                let av = _mm256_set1_epi32(a.add(i * q.kp + 2 * t).cast::<i32>().read_unaligned());
                for (c, v) in row.iter_mut().zip(&bv) {
                    *c = _mm256_add_epi32(*c, _mm256_madd_epi16(av, *v));
                }
            }
        }
        // Constant indices, as in the VNNI kernel.
        macro_rules! rows {
            ($($i:literal)*) => {$(
                if let Some(row) = acc.get($i) {
                    if let Some(&v) = row.first() {
                        finish(q, v, blk0, $i, sa[$i], out, epi);
                    }
                    if let Some(&v) = row.get(1) {
                        finish(q, v, blk0 + 1, $i, sa[$i], out, epi);
                    }
                }
            )*};
        }
        rows!(0 1 2 3 4 5);
    }

    /// Row `i` of block `blk`'s 8 sums to outputs: scales, bias, GELU, residual, store.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn finish(
        q: &QLinear,
        acc: __m256i,
        blk: usize,
        i: usize,
        sa: f32,
        out: *mut f32,
        (gelu, res): (bool, *const f32),
    ) {
        let c0 = blk * NB_COLS_256;
        let valid = q.n.saturating_sub(c0).min(NB_COLS_256);
        let (mask, full) = (lane_mask(valid), valid == NB_COLS_256);
        let sw = _mm256_loadu_ps(q.scale.as_ptr().add(c0));
        let bias = _mm256_loadu_ps(q.bias.as_ptr().add(c0));
        let sum = _mm256_cvtepi32_ps(acc);
        let mut y = _mm256_fmadd_ps(sum, _mm256_mul_ps(_mm256_set1_ps(sa), sw), bias);
        if gelu {
            y = gelu256(y);
        }
        let at = i * q.n + c0;
        if !res.is_null() {
            y = _mm256_add_ps(y, load8(res.add(at), mask, full));
        }
        store8(out.add(at), mask, full, y);
    }
}

/// Dispatches to the micro-kernel for this tile's shape (`sa.len()` rows ≤ MR, `nb` ≤ NB).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_tile(
    q: &QLinear,
    a: *const u8,
    sa: &[f32],
    blk0: usize,
    nb: usize,
    out: *mut f32,
    epi: (bool, *const f32),
    ahead: *const i8,
) {
    macro_rules! rows {
        ($nb:literal) => {
            match sa.len() {
                8 => tile::<8, $nb>(q, a, sa, blk0, out, epi, ahead),
                7 => tile::<7, $nb>(q, a, sa, blk0, out, epi, ahead),
                6 => tile::<6, $nb>(q, a, sa, blk0, out, epi, ahead),
                5 => tile::<5, $nb>(q, a, sa, blk0, out, epi, ahead),
                4 => tile::<4, $nb>(q, a, sa, blk0, out, epi, ahead),
                3 => tile::<3, $nb>(q, a, sa, blk0, out, epi, ahead),
                2 => tile::<2, $nb>(q, a, sa, blk0, out, epi, ahead),
                1 => tile::<1, $nb>(q, a, sa, blk0, out, epi, ahead),
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
/// whole `k` loop. Each step also asks for a line at `ahead` (see
/// [`QLinear::next_group_ahead`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize, const B: usize>(
    q: &QLinear,
    a: *const u8,
    sa: &[f32],
    blk0: usize,
    out: *mut f32,
    (gelu, res): (bool, *const f32),
    ahead: *const i8,
) {
    use std::arch::x86_64::*;
    let k4 = q.kp / 4;
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    let w = q.weights().as_ptr();
    for kk in 0..k4 {
        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(kk * 64));
        let mut bv = [_mm512_setzero_si512(); B];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(w.add(((blk0 + j) * k4 + kk) * 64).cast());
            // 2 KiB (32 steps) ahead, as the f32 kernels (`gemm::x86::PREFETCH_BYTES`):
            // BERT-base int8 +5–8%, e5-small +2–5% (3 of 3 interleaved pairs, Intel Xeon,
            // `STREAMBED_INT8_KERNEL=vnni`). The AVX2 kernel, 16 bytes a step, gained
            // nothing from it.
            let ahead = ((blk0 + j) * k4 + kk) * 64 + crate::embed::gemm::x86::PREFETCH_BYTES;
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(ahead).cast());
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
    let y = _mm512_fmadd_ps(sum, _mm512_mul_ps(_mm512_set1_ps(sa), sw), bias);
    crate::embed::gemm::x86::gelu_residual_store(y, gelu, res, out, i * q.n + c0, mask);
}

cpu_linear_op!(QLinear, "streambed-int8-linear");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::gemm::tests::{lcg, reference};

    /// The first `NB` tiles over a group point at the next group's blocks, one each, in
    /// order; later tiles, and a range's last group, at the group's own first block.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles_ask_for_the_next_group_one_block_each() {
        let (n, k) = (NB * NB_COLS * 3, 40);
        let q = QLinear::with_kernel(&vec![0.5; n * k], &vec![0.0; n], n, k, Kernel::Vnni);
        let base = q.weights().as_ptr() as usize;
        let block = q.kp / 4 * 64;
        for tile in 0..NB {
            let got = q.next_group_ahead(NB, true, tile) as usize;
            assert_eq!(got - base, (2 * NB + tile) * block, "tile {tile}");
        }
        for (blk0, next, tile) in [(NB, true, NB), (NB, true, NB + 5), (NB, false, 0)] {
            assert_eq!(
                q.next_group_ahead(blk0, next, tile) as usize - base,
                blk0 * block
            );
        }
    }

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

    /// Every kernel this processor has computes the portable loop's integers, for
    /// odd shapes and every epilogue.
    #[test]
    fn every_kernel_equals_the_portable_loop() {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
            }
            for k in Kernel::supported() {
                if k.avx512() {
                    kernels.push(k);
                }
            }
        }
        if kernels.len() == 1 {
            eprintln!("SKIPPED every_kernel_equals_the_portable_loop: no fast kernel runs here");
        }
        for &kernel in &kernels {
            for &(m, n, k) in &[
                (21, 100, 44),
                (7, 8, 4),
                (13, 37, 101),
                (30, 96, 3072),
                (77, 80, 200),
            ] {
                let mut seed = (m * 31 + n * 7 + k) as u64;
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
                let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                let q = QLinear::with_kernel(&w, &b, n, k, kernel);
                let (mut qa, mut sa) = (Vec::new(), Vec::new());
                let at = q.quantize_rows(&x, m, &mut qa, &mut sa);
                let qa = &qa[at..];
                for epi in [
                    Epilogue::Bias,
                    Epilogue::BiasGelu,
                    Epilogue::BiasResidual(&res),
                ] {
                    let fast = par_forward(&q, &x, m, &epi);
                    let mut slow = vec![0f32; m * n];
                    // SAFETY: m rows of qa in, m rows of n out.
                    unsafe {
                        q.portable_tile(qa.as_ptr(), &sa, 0..n, slow.as_mut_ptr(), epi.parts_at(0))
                    };
                    for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                            "{kernel:?} {m}x{n}x{k} at {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// Split over the pool from rows quantised once, every kernel gives what one call
    /// over all the units gives, for any number of parts (more parts than units too).
    #[test]
    fn split_runs_equal_one_run() {
        let (m, n, k) = (45, 200, 96);
        let mut seed = 11;
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
        for kernel in Kernel::supported() {
            let q = QLinear::with_kernel(&w, &b, n, k, kernel);
            let epi = Epilogue::BiasResidual(&res);
            let mut whole = vec![0f32; m * n];
            // SAFETY: m rows of k in, m rows of n out, for every test below.
            unsafe { q.run(&x, m, whole.as_mut_ptr(), &epi, 0..q.units()) };
            for parts in [1, 2, 5, q.units(), q.units() + 3] {
                let mut split = vec![f32::NAN; m * n];
                unsafe { q.run_split(&x, m, split.as_mut_ptr(), &epi, parts) };
                assert_eq!(split, whole, "{kernel:?} in {parts} parts");
            }
        }
    }

    /// The AVX2 rows are the VNNI path's bytes less 128, the tail and odd lengths too.
    #[test]
    fn i16_rows_are_the_shifted_bytes_unshifted() {
        let mut seed = 3;
        for len in [1, 7, 16, 37, 768] {
            let row: Vec<f32> = (0..len).map(|_| lcg(&mut seed) * 3.0).collect();
            let (mut u, mut su) = (vec![0u8; len], 0f32);
            quantize_row_loop(&row, &mut u, &mut su);
            let (mut q, mut sq) = (vec![0i16; len], 0f32);
            quantize_row_i16(&row, &mut q, &mut sq);
            assert_eq!(su, sq);
            let want: Vec<i16> = u.iter().map(|&v| v as i16 - 128).collect();
            assert_eq!(q, want, "length {len}");
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
