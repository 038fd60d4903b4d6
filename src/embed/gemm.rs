//! f32 linear layers for the CPU: weights packed once at load into column panels of the
//! micro-kernel's width, and the bias, GELU and residual applied in the kernel's epilogue
//! while the tile is still in registers.
//!
//! `y = x Wᵀ + b`, `W` is `(n, k)` (PyTorch's `Linear.weight`). A panel holds `nr`
//! consecutive output channels, `k` rows of `nr` floats (`[panel][k][nr]`), zero-padded
//! past `n`, so one aligned load per `k` step feeds the tile. The activation is read in
//! place (row-major `(m, k)`), broadcasting one value per row and step.
//!
//! Kernels, chosen at load by what the processor has: AVX-512F (12 rows × 32 columns, 24
//! accumulators), AVX2+FMA (6 rows × 16 columns, 12 accumulators), and a portable loop
//! (correct, slow) for anything else. Callers split work by rows (`run` on a row block)
//! or by panels (the `units` range), never inside a tile, so the kernels are sequential
//! and a thread pool's work stealing balances them (see `cpu`).

use std::ops::Range;

use candle_core::{CpuStorage, Layout, Shape};
use rayon::prelude::*;

use super::amx::{aligned, LINE};
use super::ops::SendPtr;

/// What follows the matmul, per output element.
pub enum Epilogue<'a> {
    /// `+ bias`
    Bias,
    /// `gelu(· + bias)`, the exact (erf) form.
    BiasGelu,
    /// `· + bias + residual`, the residual in the output's layout (row stride `n`).
    BiasResidual(&'a [f32]),
}

impl Epilogue<'_> {
    /// Whether to apply GELU, and the residual (null for none) moved to the output
    /// element `at` (row-major, stride `n`): what the kernels take.
    pub(crate) fn parts_at(&self, at: usize) -> (bool, *const f32) {
        match self {
            Epilogue::Bias => (false, std::ptr::null()),
            Epilogue::BiasGelu => (true, std::ptr::null()),
            Epilogue::BiasResidual(r) => (false, r[at..].as_ptr()),
        }
    }
}

/// A CPU linear layer that runs on a block of rows and a range of its column units
/// (panels), sequentially: the unit of work the forward pass schedules.
pub trait RowLinear: Sync {
    fn n(&self) -> usize;
    fn k(&self) -> usize;
    /// Column units (panels or blocks) the output can be split into.
    fn units(&self) -> usize;
    /// Bytes of packed weights: what one pass over all the units reads.
    fn weight_bytes(&self) -> usize;
    /// Row blocks are best a multiple of this (a kernel that computes whole tiles of
    /// rows, padding included, says how many).
    fn row_align(&self) -> usize {
        1
    }
    /// `out[r][c] = epi(Σ x[r][·] W[c][·])` for rows `0..m` and the columns of `units`.
    ///
    /// # Safety
    /// `x` holds `m` rows of `k`; `out` points at `m` rows of `n` floats (and a residual,
    /// if any, has as many); only the columns of `units` are written.
    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, units: Range<usize>);

    /// All the units for rows `0..m`, in `parts` tasks of consecutive units on the thread
    /// pool. A layer whose rows need preparing (int8 quantises them) overrides this to
    /// prepare them once, not once per part.
    ///
    /// # Safety
    /// As [`RowLinear::run`], for all the units.
    unsafe fn run_split(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, parts: usize) {
        // SAFETY: each part writes the columns of its own units only.
        for_each_part(self.units(), parts, out, |o, units| unsafe {
            self.run(x, m, o, epi, units)
        });
    }
}

/// Splits `0..units` into at most `parts` ranges of consecutive units and runs `part`
/// on each, over the thread pool, with the output pointer.
pub(crate) fn for_each_part(
    units: usize,
    parts: usize,
    out: *mut f32,
    part: impl Fn(*mut f32, Range<usize>) + Sync,
) {
    if units == 0 {
        return;
    }
    let per = units.div_ceil(parts.max(1));
    let ptr = SendPtr(out);
    (0..units.div_ceil(per)).into_par_iter().for_each(|p| {
        let ptr = &ptr;
        part(ptr.0, p * per..((p + 1) * per).min(units));
    });
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// The best kernel family this processor runs, or the one `STREAMBED_F32_KERNEL` names
/// (`avx512`, `avx2`, `portable`) if the processor runs it: for comparing kernels on one
/// machine (an AVX-512 machine runs the AVX2 kernels AMD Zen 3 gets). Detected once; the
/// f32 matmuls, attention and LayerNorm all follow it.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| pick_by_env("STREAMBED_F32_KERNEL", &Isa::supported(), Isa::name))
}

/// The kernel of `runs` (best first) that the environment variable `var` names, if this
/// processor runs it, else the best, with a warning: how `STREAMBED_F32_KERNEL` and
/// `STREAMBED_INT8_KERNEL` pick a weaker kernel to compare with.
pub(crate) fn pick_by_env<K: Copy>(var: &str, runs: &[K], name: fn(K) -> &'static str) -> K {
    let Ok(asked) = std::env::var(var) else {
        return runs[0];
    };
    match runs
        .iter()
        .find(|&&k| name(k) == asked.trim().to_ascii_lowercase())
    {
        Some(&k) => k,
        None => {
            tracing::warn!(
                "{var}={asked:?} is not one this processor runs ({}); using {}",
                runs.iter().map(|&k| name(k)).collect::<Vec<_>>().join(", "),
                name(runs[0])
            );
            runs[0]
        }
    }
}

impl Isa {
    /// The kernel families this processor runs, best first.
    pub fn supported() -> Vec<Isa> {
        let mut runs = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                runs.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                runs.push(Isa::Avx2);
            }
        }
        runs.push(Isa::Portable);
        runs
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }
}

pub struct PackedLinear {
    n: usize,
    k: usize,
    nr: usize,
    panels: usize,
    isa: Isa,
    /// The panels, from `packed[at]` on: a 64-byte line (see [`aligned`]).
    packed: Vec<f32>,
    at: usize,
    /// Padded to `panels * nr`.
    bias: Vec<f32>,
    /// Whether the rows are copied into tiles before the kernel reads them. Rows whose
    /// stride is a multiple of 4 KiB (k = 1024, 2048, 3072: BERT-base's FFN down
    /// projection) fall into one L1 set, and the 12 rows of an AVX-512 tile evict each
    /// other (25% slower on AMD EPYC): those are copied into tiles, `[k][rows]` per tile,
    /// which the kernel then reads as one stream. Other strides are read in place (the
    /// copy costs up to 10% where n is small). Not where the L1 set has a way for each of
    /// the tile's rows ([`l1_holds_a_tile`]).
    pack_rows: bool,
}

impl PackedLinear {
    /// `weight` is `(n, k)` row-major, `bias` has `n` values.
    pub fn new(weight: &[f32], bias: &[f32], n: usize, k: usize) -> Self {
        Self::with_isa(weight, bias, n, k, isa())
    }

    pub fn with_isa(weight: &[f32], bias: &[f32], n: usize, k: usize, isa: Isa) -> Self {
        assert_eq!(weight.len(), n * k, "weight shape");
        assert_eq!(bias.len(), n, "bias shape");
        let nr = if isa == Isa::Avx512 { 32 } else { 16 };
        let panels = n.div_ceil(nr);
        // A panel's rows (`nr` floats, 64 or 128 bytes) start on a cache line only if the
        // panels do; the allocator gives 16 bytes (glibc puts large blocks at a page + 16),
        // and then one load in every line-sized step spans two lines.
        let mut packed = vec![0f32; panels * k * nr + LINE / 4];
        let at = aligned(&packed);
        for c in 0..n {
            let (p, lane) = (c / nr, c % nr);
            for (t, &w) in weight[c * k..(c + 1) * k].iter().enumerate() {
                packed[at + (p * k + t) * nr + lane] = w;
            }
        }
        let mut b = vec![0f32; panels * nr];
        b[..n].copy_from_slice(bias);
        Self {
            n,
            k,
            nr,
            panels,
            isa,
            packed,
            at,
            bias: b,
            pack_rows: isa == Isa::Avx512 && k.is_multiple_of(1024) && !l1_holds_a_tile(),
        }
    }

    /// The whole product, split over the thread pool (the padded candle pass uses it).
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        par_forward(self, x, m, &Epilogue::Bias)
    }
}

/// Whether this processor's L1 data cache has at least as many ways as the AVX-512 tile
/// has rows, so that 12 rows 4 KiB apart (one L1 set) do not evict each other and need
/// no copying into tiles. Intel Xeon with AMX (48 KiB, 12 ways), BERT-base f32 "highest"
/// with the rows in place against copied: 88.9/88.2/87.2/88.6/87.5/86.6 against
/// 85.2/86.0/84.6/86.5/85.3/87.9 sent/s (5 of 6 interleaved pairs, +2-4%), and in a
/// second build 84.1/85.8/83.9 against 83.9/83.9/83.9: a small gain, and one copy of the
/// FFN rows less. AMD's L1 (8 ways) keeps the copy. Where Linux does not say (no sysfs),
/// the rows are copied, as before.
fn l1_holds_a_tile() -> bool {
    static HOLDS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HOLDS.get_or_init(|| l1_data_ways().is_some_and(|ways| ways >= MR_512))
}

/// Ways of the first CPU's level-1 data cache, from sysfs.
fn l1_data_ways() -> Option<usize> {
    let read = |dir: &std::path::Path, name: &str| {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|v| v.trim().to_owned())
    };
    std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|d| {
            read(d, "level").as_deref() == Some("1") && read(d, "type").as_deref() == Some("Data")
        })
        .and_then(|d| read(&d, "ways_of_associativity")?.parse().ok())
}

/// Rows per micro-tile for each kernel.
const MR_512: usize = 12;
const MR_256: usize = 6;
/// Depth of one pass over the panels: partial sums go through the output between
/// passes, the epilogue runs after the last.
const KC: usize = 1536;

impl RowLinear for PackedLinear {
    fn n(&self) -> usize {
        self.n
    }
    fn k(&self) -> usize {
        self.k
    }
    fn units(&self) -> usize {
        self.panels
    }
    fn weight_bytes(&self) -> usize {
        (self.packed.len() - LINE / 4) * std::mem::size_of::<f32>()
    }

    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, units: Range<usize>) {
        if !self.pack_rows {
            return self.run_rows(x, m, out, epi, units, Rows::InPlace);
        }
        APACK.with(|cell| {
            let pack = &mut *cell.borrow_mut();
            self.run_rows(x, m, out, epi, units, Rows::PackEachChunk(pack))
        })
    }

    /// Rows that want packing are packed once, all `k` of them, for every part.
    unsafe fn run_split(&self, x: &[f32], m: usize, out: *mut f32, epi: &Epilogue, parts: usize) {
        if !self.pack_rows {
            // SAFETY: each part writes the columns of its own units only.
            return for_each_part(self.panels, parts, out, |o, units| unsafe {
                self.run_rows(x, m, o, epi, units, Rows::InPlace)
            });
        }
        // Taken out of the cell, not borrowed: while it waits for the parts, this thread
        // may run other tasks that pack rows of their own.
        let mut pack = APACK_ALL.with(|c| c.take());
        pack_tiles_par(x, self.k, m, self.mr(), &mut pack);
        // SAFETY: as above.
        for_each_part(self.panels, parts, out, |o, units| unsafe {
            self.run_rows(x, m, o, epi, units, Rows::Packed(&pack))
        });
        // Kept up to 4 Mi floats (a span of BERT-base's FFN rows, 1024 × 3072); a rare
        // larger one is given back.
        if pack.capacity() <= 4 << 20 {
            APACK_ALL.with(|c| c.replace(pack));
        }
    }
}

/// Where a tile's rows come from.
enum Rows<'a> {
    /// Read in place from `x`.
    InPlace,
    /// Copied into tiles chunk by chunk, in this buffer (see [`pack_tiles`]).
    PackEachChunk(&'a mut Vec<f32>),
    /// Already in tiles, all `k` deep (`pack_tiles` with `k0 = 0, kc = k`).
    Packed(&'a [f32]),
}

impl PackedLinear {
    /// Rows per micro-tile.
    fn mr(&self) -> usize {
        match self.isa {
            Isa::Avx512 => MR_512,
            Isa::Avx2 => MR_256,
            Isa::Portable => 4,
        }
    }

    /// [`RowLinear::run`] with the rows from `rows`.
    ///
    /// # Safety
    /// As [`RowLinear::run`]; `Rows::Packed` holds `m` rows of `x` in tiles.
    unsafe fn run_rows(
        &self,
        x: &[f32],
        m: usize,
        out: *mut f32,
        epi: &Epilogue,
        units: Range<usize>,
        mut rows_from: Rows,
    ) {
        debug_assert!(x.len() >= m * self.k && units.end <= self.panels);
        let (k, mr) = (self.k, self.mr());
        // Depth chunks outermost: a block's rows times one chunk stay in L2 while every
        // panel of the range passes over them.
        let mut k0 = 0;
        loop {
            let kc = KC.min(k - k0);
            let chunk = Chunk {
                k0,
                kc,
                first: k0 == 0,
                last: k0 + kc == k,
            };
            if let Rows::PackEachChunk(pack) = &mut rows_from {
                pack_tiles(x, k, m, mr, k0, kc, pack);
            }
            // Then blocks of rows: each stays in L2 while the range's panels pass over it.
            let mc = row_block(kc, mr);
            let mut r0 = 0;
            while r0 < m {
                let r1 = (r0 + mc).min(m);
                self.run_block(x, out, epi, &units, &rows_from, r0..r1, &chunk);
                r0 = r1;
            }
            k0 += kc;
            if k0 >= k {
                break;
            }
        }
    }

    /// Rows `rows` (whole tiles of `mr`, but for the last) of one depth chunk times every
    /// panel of `units`.
    ///
    /// # Safety
    /// As [`RowLinear::run`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_block(
        &self,
        x: &[f32],
        out: *mut f32,
        epi: &Epilogue,
        units: &Range<usize>,
        rows_from: &Rows,
        rows: Range<usize>,
        c: &Chunk,
    ) {
        let (k, n, nr, mr) = (self.k, self.n, self.nr, self.mr());
        for p in units.clone() {
            let c0 = p * nr;
            let valid = (n - c0).min(nr);
            let w = self.packed.as_ptr().add(self.at + (p * k + c.k0) * nr);
            let bias = self.bias.as_ptr().add(c0);
            let mut r = rows.start;
            while r < rows.end {
                let tile_rows = mr.min(rows.end - r);
                // Element (i, kk) of the tile is at a[i·row_step + kk·k_step].
                let (a, row_step, k_step) = match rows_from {
                    Rows::InPlace => (x.as_ptr().add(r * k + c.k0), k, 1),
                    Rows::PackEachChunk(pack) => (pack.as_ptr().add(r * c.kc), 1, tile_rows),
                    Rows::Packed(pack) => {
                        (pack.as_ptr().add(r * k + c.k0 * tile_rows), 1, tile_rows)
                    }
                };
                let (gelu, res) = epi.parts_at(r * n + c0);
                let ahead = next_panel_ahead(
                    w,
                    k * nr,
                    c.kc * nr,
                    p + 1 < units.end,
                    (r - rows.start) / mr,
                );
                let t = Tile {
                    a,
                    row_step,
                    k_step,
                    kc: c.kc,
                    w,
                    out: out.add(r * n + c0),
                    n,
                    valid,
                    first: c.first,
                    last: c.last,
                    bias,
                    res,
                    gelu,
                    ahead,
                };
                match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => x86::tile512(tile_rows, &t),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => x86::tile256(tile_rows, &t),
                    _ => tile_portable(tile_rows, nr, &t),
                }
                r += tile_rows;
            }
        }
    }
}

/// Where tile number `tile` over a panel asks for the next panel's weights: the next
/// panel's chunk starts `panel_floats` after `w` (this chunk) and is `chunk_floats` long.
/// The assembly tiles ask for a line (`prefetcht1`, into L2) every two `k` steps, moving
/// a quarter of a chunk a tile (the AVX-512 tile 64 bytes a loop, the AVX2 tile 32: each
/// line twice), so the first four tiles over a panel bring the next one's chunk into
/// L2 while they multiply. Later tiles, and the last panel of a range (the next range
/// may run on another core), ask for their own panel again, which is in L1 already.
///
/// Without it the first tile over each panel read its weights from memory at the rate
/// it multiplies them (128 bytes every 12 cycles), faster than one core's stream from
/// memory; BERT-base f32 (340 MiB of weights, read once a batch) lost 7% to that against
/// the same products with one layer's weights in cache. Intel Xeon (AVX-512, 2 cores),
/// twelve BERT-base layers of products, 600 rows, interleaved in one process: 393–398 →
/// 414–421 GFLOP/s (+5.5–7.7%); a line every step (two tiles a chunk) +3–4%; asking
/// across ranges as well, no better; `prefetcht0` and `prefetcht2` the same within the
/// noise. The AVX2 kernels on the same Intel: 233–234 → 240–242 (+3–4%).
fn next_panel_ahead(
    w: *const f32,
    panel_floats: usize,
    chunk_floats: usize,
    next: bool,
    tile: usize,
) -> *const f32 {
    let per_tile = chunk_floats / 4;
    if !next || tile >= 4 {
        return w;
    }
    w.wrapping_add(panel_floats + tile * per_tile)
}

/// One depth chunk of a product: columns `k0..k0 + kc` of the rows; the first starts
/// from zero, the last applies the epilogue.
struct Chunk {
    k0: usize,
    kc: usize,
    first: bool,
    last: bool,
}

/// Bytes of rows (one depth chunk of them) that every panel of a range passes over
/// before the next rows are read.
///
/// Split by columns (BERT-base f32, `cpu::split_by_columns`) a part multiplies all of a
/// batch's rows by a few panels: 600 FFN rows of 3072 are 7 MiB, past L2, and were read
/// again from L3 for every panel. In blocks of 512 KiB the rows stay in L2 while the
/// part's panels (a few hundred KiB a chunk) pass over them. `kernel_speed 768 3072 600`
/// split by columns, Intel Xeon (AVX-512, 2 cores): 600×3072 → 768 from 203–233 to
/// 252–266 GFLOP/s (264–283 with its rows packed in parallel too), 600×768 → 2304 from
/// 270–276 to 296–316; 128 KiB–1 MiB measured within the noise of each other, whole rows
/// below all of them.
const ROW_BLOCK_BYTES: usize = 512 << 10;

/// Rows per block of [`ROW_BLOCK_BYTES`] for a depth chunk of `kc`, whole tiles of `mr`.
fn row_block(kc: usize, mr: usize) -> usize {
    (ROW_BLOCK_BYTES / (kc * 4) / mr).max(1) * mr
}

thread_local! {
    /// The row tiles of the chunk in progress (grown, never shrunk: at most one block of
    /// rows times `KC`).
    static APACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// All of a matmul's rows in tiles, shared by its column parts (`run_split`).
    static APACK_ALL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies columns `k0..k0 + kc` of rows `0..m` of `x` (row stride `k`) into `pack` as
/// consecutive tiles of `mr` rows (the last may be shorter), each `[kc][rows]`: the
/// tile starting at row `r` begins at `r * kc`.
fn pack_tiles(x: &[f32], k: usize, m: usize, mr: usize, k0: usize, kc: usize, pack: &mut Vec<f32>) {
    if pack.len() < m * kc {
        pack.resize(m * kc, 0.0);
    }
    pack_tiles_into(x, k, m, mr, k0, kc, pack);
}

/// [`pack_tiles`] into `pack`, which holds at least `m * kc` values.
fn pack_tiles_into(
    x: &[f32],
    k: usize,
    m: usize,
    mr: usize,
    k0: usize,
    kc: usize,
    pack: &mut [f32],
) {
    let mut r = 0;
    while r < m {
        let rows = mr.min(m - r);
        let tile = &mut pack[r * kc..(r + rows) * kc];
        let src = &x[r * k + k0..(r + rows - 1) * k + k0 + kc];
        // Written in order, read down the rows (`rows` streams, each sequential).
        for (kk, dst) in tile.chunks_exact_mut(rows).enumerate() {
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < rows and kk < kc, so the index is inside `src`.
                *d = unsafe { *src.get_unchecked(i * k + kk) };
            }
        }
        r += rows;
    }
}

/// [`pack_tiles`] of all `k` columns, in groups of tiles over the pool: one thread
/// copying a large product's rows (BERT-base's 3072-wide FFN rows) would keep the others
/// waiting.
fn pack_tiles_par(x: &[f32], k: usize, m: usize, mr: usize, pack: &mut Vec<f32>) {
    const TILES: usize = 4;
    if pack.len() < m * k {
        pack.resize(m * k, 0.0);
    }
    let group = TILES * mr;
    pack[..m * k]
        .par_chunks_mut(group * k)
        .enumerate()
        .for_each(|(g, dst)| {
            let r0 = g * group;
            let rows = group.min(m - r0);
            pack_tiles_into(&x[r0 * k..], k, rows, mr, 0, k, dst);
        });
}

/// One micro-tile's operands: `rows` rows of `a` (element `(i, kk)` at `i·row_step +
/// kk·k_step`), `kc` deep, times one panel chunk `w`, into `out` (stride `n`), `valid`
/// of the panel's columns. The first chunk starts from zero, later ones from the
/// partial sums in `out`; only the last applies the epilogue (so `out` must not alias
/// the residual).
struct Tile {
    a: *const f32,
    row_step: usize,
    k_step: usize,
    kc: usize,
    w: *const f32,
    out: *mut f32,
    n: usize,
    valid: usize,
    first: bool,
    last: bool,
    bias: *const f32,
    res: *const f32,
    gelu: bool,
    /// Where the assembly tile's loop asks for the next panel's weights, a line every two
    /// `k` steps (see [`next_panel_ahead`]); the tile's own panel where there is none.
    ahead: *const f32,
}

/// # Safety
/// As [`RowLinear::run`], for the tile's rows and panel.
unsafe fn tile_portable(rows: usize, nr: usize, t: &Tile) {
    for i in 0..rows {
        for j in 0..t.valid {
            let at = i * t.n + j;
            let mut s = if t.first { 0f32 } else { *t.out.add(at) };
            for kk in 0..t.kc {
                s += *t.a.add(i * t.row_step + kk * t.k_step) * *t.w.add(kk * nr + j);
            }
            if !t.last {
                *t.out.add(at) = s;
                continue;
            }
            let mut y = s + *t.bias.add(j);
            if t.gelu {
                y = super::ops::gelu(y);
            }
            if !t.res.is_null() {
                y += *t.res.add(at);
            }
            *t.out.add(at) = y;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Tile;
    use std::arch::x86_64::*;

    /// The rational erf's coefficients after the leading one (`ops::erf`).
    const ERF_P: [f32; 6] = [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.9546e-3,
        -1.609_603_3e-2,
    ];
    const ERF_Q: [f32; 4] = [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2];

    /// GELU (erf form) on 16 lanes, the rational erf of `ops::erf`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn gelu512(x: __m512) -> __m512 {
        let z = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm512_max_ps(_mm512_set1_ps(-4.0), _mm512_min_ps(z, _mm512_set1_ps(4.0)));
        let z2 = _mm512_mul_ps(z, z);
        let mut p = _mm512_set1_ps(-2.726_142_3e-10);
        for c in ERF_P {
            p = _mm512_fmadd_ps(p, z2, _mm512_set1_ps(c));
        }
        let mut q = _mm512_set1_ps(-1.456_607_2e-5);
        for c in ERF_Q {
            q = _mm512_fmadd_ps(q, z2, _mm512_set1_ps(c));
        }
        let erf = _mm512_div_ps(_mm512_mul_ps(z, p), q);
        let half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
        _mm512_fmadd_ps(half_x, erf, half_x)
    }

    /// How far ahead of the `k` step in progress the f32 kernels ask for their panel's
    /// weights: 2 KiB (16 steps of the AVX-512 tile, 32 of the AVX2 one). A panel is one
    /// sequential stream from L2, but the hardware prefetchers do not keep it in L1 ahead
    /// of a tile that also reads 12 rows: the tile alone ran 12–17% faster asking 1–2 KiB
    /// ahead (0.5 and 4 KiB gained ~10%), end to end f32 "highest" 4–18% (AVX-512) and
    /// 5–13% (the AVX2 kernels, `STREAMBED_F32_KERNEL=avx2`) on Intel Xeon with AMX
    /// (docs/PERFORMANCE.md, session 15). Reading past a panel's end is harmless (a
    /// prefetch never faults) and useful: the next panel follows it. Measured and not
    /// kept: prefetching the tile's rows (no gain), the next panel into L2 spread over
    /// the row tiles (5–7% slower), shorter depth chunks (KC 128–512: slower).
    pub(crate) const PREFETCH_BYTES: usize = 2048;
    const PREFETCH_FLOATS: usize = PREFETCH_BYTES / 4;

    /// Prefetches `lines` cache lines of panel weights `PREFETCH_FLOATS` after `w`.
    #[inline(always)]
    unsafe fn prefetch_panel(w: *const f32, lines: usize) {
        for l in 0..lines {
            let p = w.wrapping_add(PREFETCH_FLOATS + l * 16) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(p);
        }
    }

    pub(super) unsafe fn tile512(rows: usize, t: &Tile) {
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => k512::<$r>(t),)*
                    _ => unreachable!("tile rows"),
                }
            };
        }
        // Whole tiles (all but a block's last) run the assembly tile.
        if rows == 12 {
            return k512_asm(t);
        }
        go!(1 2 3 4 5 6 7 8 9 10 11)
    }

    /// The 12-row tile of [`k512`] in assembly: the row addresses as four base registers
    /// and a scaled row stride (`[b + rs·{1,2}]`), two `k` steps a loop with the second's
    /// addresses as displacements, so a step spends three integer instructions on
    /// addresses and the loop, not the compiler's ten. The sums go through `c` (24
    /// vectors) to the same epilogue. Same products in the same order as `k512`, so the
    /// same bits. Rows in place step 4 bytes, rows in tiles `4 · 12`; any other layout
    /// runs the compiled tile. Each loop also asks for a line of the next panel at
    /// `Tile::ahead` (see [`super::next_panel_ahead`]), which the compiled tiles (a
    /// block's last, short one) do not.
    ///
    /// Intel Xeon (AVX-512, 2 cores), f32 "highest", interleaved against the `k512::<12>`
    /// the compiler made: BERT-base 80.4–82.1 against 76.6–78.3 sent/s (+3–6%, 3 of 3
    /// pairs), e5-small 356.8–379.7 against 353.3–360.7 (one step a loop, six integer
    /// instructions). Written out in full (no loop unrolled in Rust): unrolled, the
    /// compiler kept the accumulators in memory.
    pub(super) unsafe fn k512_asm(t: &Tile) {
        match t.k_step {
            1 => k512_asm_in_place(t),
            12 => k512_asm_in_tiles(t),
            _ => k512::<12>(t),
        }
    }

    /// One `k` step of the 12 × 32 tile: the panel's two vectors at `[w + $w]`, the rows'
    /// values `$a` bytes past the row bases.
    macro_rules! k512_step {
        ($a:literal, $w:literal) => {
            concat!(
                "vmovups zmm0, zmmword ptr [{w} + ",
                $w,
                "]\n",
                "vmovups zmm1, zmmword ptr [{w} + ",
                $w,
                " + 64]\n",
                "prefetcht0 [{w} + {pf} + ",
                $w,
                "]\n",
                "prefetcht0 [{w} + {pf} + ",
                $w,
                " + 64]\n",
                "vbroadcastss zmm2, dword ptr [{b0} + ",
                $a,
                "]\n",
                "vfmadd231ps zmm8, zmm2, zmm0\n",
                "vfmadd231ps zmm9, zmm2, zmm1\n",
                "vbroadcastss zmm3, dword ptr [{b0} + {rs}*1 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm10, zmm3, zmm0\n",
                "vfmadd231ps zmm11, zmm3, zmm1\n",
                "vbroadcastss zmm2, dword ptr [{b0} + {rs}*2 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm12, zmm2, zmm0\n",
                "vfmadd231ps zmm13, zmm2, zmm1\n",
                "vbroadcastss zmm3, dword ptr [{b1} + ",
                $a,
                "]\n",
                "vfmadd231ps zmm14, zmm3, zmm0\n",
                "vfmadd231ps zmm15, zmm3, zmm1\n",
                "vbroadcastss zmm2, dword ptr [{b1} + {rs}*1 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm16, zmm2, zmm0\n",
                "vfmadd231ps zmm17, zmm2, zmm1\n",
                "vbroadcastss zmm3, dword ptr [{b1} + {rs}*2 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm18, zmm3, zmm0\n",
                "vfmadd231ps zmm19, zmm3, zmm1\n",
                "vbroadcastss zmm2, dword ptr [{b2} + ",
                $a,
                "]\n",
                "vfmadd231ps zmm20, zmm2, zmm0\n",
                "vfmadd231ps zmm21, zmm2, zmm1\n",
                "vbroadcastss zmm3, dword ptr [{b2} + {rs}*1 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm22, zmm3, zmm0\n",
                "vfmadd231ps zmm23, zmm3, zmm1\n",
                "vbroadcastss zmm2, dword ptr [{b2} + {rs}*2 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm24, zmm2, zmm0\n",
                "vfmadd231ps zmm25, zmm2, zmm1\n",
                "vbroadcastss zmm3, dword ptr [{b3} + ",
                $a,
                "]\n",
                "vfmadd231ps zmm26, zmm3, zmm0\n",
                "vfmadd231ps zmm27, zmm3, zmm1\n",
                "vbroadcastss zmm2, dword ptr [{b3} + {rs}*1 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm28, zmm2, zmm0\n",
                "vfmadd231ps zmm29, zmm2, zmm1\n",
                "vbroadcastss zmm3, dword ptr [{b3} + {rs}*2 + ",
                $a,
                "]\n",
                "vfmadd231ps zmm30, zmm3, zmm0\n",
                "vfmadd231ps zmm31, zmm3, zmm1\n",
            )
        };
    }

    /// [`k512_asm`] for rows `$ks` bytes a `k` step apart (`$ks2` = two steps).
    macro_rules! k512_asm_tile {
        ($name:ident, $ks:literal, $ks2:literal) => {
            #[target_feature(enable = "avx512f")]
            unsafe fn $name(t: &Tile) {
                #[repr(align(64))]
                struct Sums([f32; 12 * 32]);
                let mut c = Sums([0.0; 12 * 32]);
                let a = t.a;
                std::arch::asm!(
                    "vxorps zmm8, zmm8, zmm8",
                    "vxorps zmm9, zmm9, zmm9",
                    "vxorps zmm10, zmm10, zmm10",
                    "vxorps zmm11, zmm11, zmm11",
                    "vxorps zmm12, zmm12, zmm12",
                    "vxorps zmm13, zmm13, zmm13",
                    "vxorps zmm14, zmm14, zmm14",
                    "vxorps zmm15, zmm15, zmm15",
                    "vxorps zmm16, zmm16, zmm16",
                    "vxorps zmm17, zmm17, zmm17",
                    "vxorps zmm18, zmm18, zmm18",
                    "vxorps zmm19, zmm19, zmm19",
                    "vxorps zmm20, zmm20, zmm20",
                    "vxorps zmm21, zmm21, zmm21",
                    "vxorps zmm22, zmm22, zmm22",
                    "vxorps zmm23, zmm23, zmm23",
                    "vxorps zmm24, zmm24, zmm24",
                    "vxorps zmm25, zmm25, zmm25",
                    "vxorps zmm26, zmm26, zmm26",
                    "vxorps zmm27, zmm27, zmm27",
                    "vxorps zmm28, zmm28, zmm28",
                    "vxorps zmm29, zmm29, zmm29",
                    "vxorps zmm30, zmm30, zmm30",
                    "vxorps zmm31, zmm31, zmm31",
                    // An odd step first (the products stay in order), then pairs.
                    "test {n}, 1",
                    "jz 4f",
                    k512_step!("0", "0"),
                    concat!("add {b0}, ", $ks),
                    concat!("add {b1}, ", $ks),
                    concat!("add {b2}, ", $ks),
                    concat!("add {b3}, ", $ks),
                    "add {w}, 128",
                    "4:",
                    "shr {n}, 1",
                    "jz 3f",
                    "2:",
                    k512_step!("0", "0"),
                    "prefetcht1 [{ahead}]",
                    k512_step!($ks, "128"),
                    "add {ahead}, 64",
                    concat!("add {b0}, ", $ks2),
                    concat!("add {b1}, ", $ks2),
                    concat!("add {b2}, ", $ks2),
                    concat!("add {b3}, ", $ks2),
                    "add {w}, 256",
                    "dec {n}",
                    "jnz 2b",
                    "3:",
                    "vmovups zmmword ptr [{c} + 0], zmm8",
                    "vmovups zmmword ptr [{c} + 64], zmm9",
                    "vmovups zmmword ptr [{c} + 128], zmm10",
                    "vmovups zmmword ptr [{c} + 192], zmm11",
                    "vmovups zmmword ptr [{c} + 256], zmm12",
                    "vmovups zmmword ptr [{c} + 320], zmm13",
                    "vmovups zmmword ptr [{c} + 384], zmm14",
                    "vmovups zmmword ptr [{c} + 448], zmm15",
                    "vmovups zmmword ptr [{c} + 512], zmm16",
                    "vmovups zmmword ptr [{c} + 576], zmm17",
                    "vmovups zmmword ptr [{c} + 640], zmm18",
                    "vmovups zmmword ptr [{c} + 704], zmm19",
                    "vmovups zmmword ptr [{c} + 768], zmm20",
                    "vmovups zmmword ptr [{c} + 832], zmm21",
                    "vmovups zmmword ptr [{c} + 896], zmm22",
                    "vmovups zmmword ptr [{c} + 960], zmm23",
                    "vmovups zmmword ptr [{c} + 1024], zmm24",
                    "vmovups zmmword ptr [{c} + 1088], zmm25",
                    "vmovups zmmword ptr [{c} + 1152], zmm26",
                    "vmovups zmmword ptr [{c} + 1216], zmm27",
                    "vmovups zmmword ptr [{c} + 1280], zmm28",
                    "vmovups zmmword ptr [{c} + 1344], zmm29",
                    "vmovups zmmword ptr [{c} + 1408], zmm30",
                    "vmovups zmmword ptr [{c} + 1472], zmm31",
                    b0 = inout(reg) a => _,
                    b1 = inout(reg) a.add(3 * t.row_step) => _,
                    b2 = inout(reg) a.add(6 * t.row_step) => _,
                    b3 = inout(reg) a.add(9 * t.row_step) => _,
                    rs = in(reg) t.row_step * 4,
                    w = inout(reg) t.w => _,
                    n = inout(reg) t.kc => _,
                    ahead = inout(reg) t.ahead => _,
                    c = in(reg) c.0.as_mut_ptr(),
                    pf = const PREFETCH_FLOATS * 4,
                    out("zmm0") _,
                    out("zmm1") _,
                    out("zmm2") _,
                    out("zmm3") _,
                    out("zmm4") _,
                    out("zmm5") _,
                    out("zmm6") _,
                    out("zmm7") _,
                    out("zmm8") _,
                    out("zmm9") _,
                    out("zmm10") _,
                    out("zmm11") _,
                    out("zmm12") _,
                    out("zmm13") _,
                    out("zmm14") _,
                    out("zmm15") _,
                    out("zmm16") _,
                    out("zmm17") _,
                    out("zmm18") _,
                    out("zmm19") _,
                    out("zmm20") _,
                    out("zmm21") _,
                    out("zmm22") _,
                    out("zmm23") _,
                    out("zmm24") _,
                    out("zmm25") _,
                    out("zmm26") _,
                    out("zmm27") _,
                    out("zmm28") _,
                    out("zmm29") _,
                    out("zmm30") _,
                    out("zmm31") _,
                    options(nostack),
                );
                let m0 = ((1u32 << t.valid.min(16)) - 1) as u16;
                let m1 = ((1u64 << t.valid.saturating_sub(16)) - 1) as u16;
                let (b0, b1) = (_mm512_loadu_ps(t.bias), _mm512_loadu_ps(t.bias.add(16)));
                for i in 0..12 {
                    let row = c.0.as_ptr().add(i * 32);
                    finish512(t, i * t.n, m0, _mm512_load_ps(row), b0);
                    if m1 != 0 {
                        finish512(t, i * t.n + 16, m1, _mm512_load_ps(row.add(16)), b1);
                    }
                }
            }
        };
    }

    k512_asm_tile!(k512_asm_in_place, "4", "8");
    k512_asm_tile!(k512_asm_in_tiles, "48", "96");
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn k512<const R: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (w, rs, ks) = (t.w, t.row_step, t.k_step);
        for kk in 0..t.kc {
            let b0 = _mm512_loadu_ps(w.add(kk * 32));
            let b1 = _mm512_loadu_ps(w.add(kk * 32 + 16));
            prefetch_panel(w.add(kk * 32), 2);
            let a = t.a.add(kk * ks);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * rs));
                row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                row[1] = _mm512_fmadd_ps(av, b1, row[1]);
            }
        }
        // Constant indices only: a register array indexed by a loop variable would be
        // kept in memory, with a store of every accumulator in every `k` step. (So the
        // earlier chunks' partial sums are added here, not loaded into `acc` first.)
        let m0 = ((1u32 << t.valid.min(16)) - 1) as u16;
        let m1 = ((1u64 << t.valid.saturating_sub(16)) - 1) as u16;
        let (b0, b1) = (_mm512_loadu_ps(t.bias), _mm512_loadu_ps(t.bias.add(16)));
        for (i, row) in acc.iter().enumerate() {
            finish512(t, i * t.n, m0, row[0], b0);
            if m1 != 0 {
                finish512(t, i * t.n + 16, m1, row[1], b1);
            }
        }
    }

    /// Adds the earlier chunks' partial sums; after the last chunk, bias, GELU and
    /// residual; then the masked store of 16 outputs at `out + at`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish512(t: &Tile, at: usize, mask: u16, acc: __m512, bias: __m512) {
        let mut y = acc;
        if !t.first {
            y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, t.out.add(at)));
        }
        if t.last {
            y = _mm512_add_ps(y, bias);
            if t.gelu {
                y = gelu512(y);
            }
            if !t.res.is_null() {
                y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, t.res.add(at)));
            }
        }
        _mm512_mask_storeu_ps(t.out.add(at), mask, y);
    }

    /// The end of the int8 and bf16 epilogues: GELU if asked, the residual at `out[at]`'s
    /// place added (none where null), the `mask`ed lanes of `y` stored at `out[at]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn gelu_residual_store(
        mut y: __m512,
        gelu: bool,
        res: *const f32,
        out: *mut f32,
        at: usize,
        mask: __mmask16,
    ) {
        if gelu {
            y = gelu512(y);
        }
        if !res.is_null() {
            y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, res.add(at)));
        }
        _mm512_mask_storeu_ps(out.add(at), mask, y);
    }

    pub(super) unsafe fn tile256(rows: usize, t: &Tile) {
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => k256::<$r>(t),)*
                    _ => unreachable!("tile rows"),
                }
            };
        }
        // Whole tiles (all but a block's last) run the assembly tile.
        if rows == 6 {
            return k256_asm(t);
        }
        go!(1 2 3 4 5)
    }

    /// The 6-row tile of [`k256`] in assembly, as [`k512_asm`] is of `k512`: two row
    /// bases and a scaled stride, two `k` steps a loop with the second's addresses as
    /// displacements. Same products in the same order, so the same bits. On Intel Xeon
    /// running the AVX2 kernels (`STREAMBED_F32_KERNEL=avx2`), f32 "highest", one step a
    /// loop against the compiled tile: BERT-base +1–4%, e5-small +1–5% (6 of 6
    /// interleaved pairs); not yet measured on AMD Zen 3, the processor that runs it for
    /// real. It asks for the next panel as [`k512_asm`] does, 32 bytes on a loop.
    pub(super) unsafe fn k256_asm(t: &Tile) {
        match t.k_step {
            1 => k256_asm_in_place(t),
            6 => k256_asm_in_tiles(t),
            _ => k256::<6>(t),
        }
    }

    /// One `k` step of the 6 × 16 tile: the panel's two vectors at `[w + $w]`, the rows'
    /// values `$a` bytes past the row bases.
    macro_rules! k256_step {
        ($a:literal, $w:literal) => {
            concat!(
                "vmovups ymm0, ymmword ptr [{w} + ",
                $w,
                "]\n",
                "vmovups ymm1, ymmword ptr [{w} + ",
                $w,
                " + 32]\n",
                "prefetcht0 [{w} + {pf} + ",
                $w,
                "]\n",
                "vbroadcastss ymm2, dword ptr [{b0} + ",
                $a,
                "]\n",
                "vfmadd231ps ymm4, ymm2, ymm0\n",
                "vfmadd231ps ymm5, ymm2, ymm1\n",
                "vbroadcastss ymm3, dword ptr [{b0} + {rs}*1 + ",
                $a,
                "]\n",
                "vfmadd231ps ymm6, ymm3, ymm0\n",
                "vfmadd231ps ymm7, ymm3, ymm1\n",
                "vbroadcastss ymm2, dword ptr [{b0} + {rs}*2 + ",
                $a,
                "]\n",
                "vfmadd231ps ymm8, ymm2, ymm0\n",
                "vfmadd231ps ymm9, ymm2, ymm1\n",
                "vbroadcastss ymm3, dword ptr [{b1} + ",
                $a,
                "]\n",
                "vfmadd231ps ymm10, ymm3, ymm0\n",
                "vfmadd231ps ymm11, ymm3, ymm1\n",
                "vbroadcastss ymm2, dword ptr [{b1} + {rs}*1 + ",
                $a,
                "]\n",
                "vfmadd231ps ymm12, ymm2, ymm0\n",
                "vfmadd231ps ymm13, ymm2, ymm1\n",
                "vbroadcastss ymm3, dword ptr [{b1} + {rs}*2 + ",
                $a,
                "]\n",
                "vfmadd231ps ymm14, ymm3, ymm0\n",
                "vfmadd231ps ymm15, ymm3, ymm1\n",
            )
        };
    }

    /// [`k256_asm`] for rows `$ks` bytes a `k` step apart (`$ks2` = two steps).
    macro_rules! k256_asm_tile {
        ($name:ident, $ks:literal, $ks2:literal) => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $name(t: &Tile) {
                #[repr(align(32))]
                struct Sums([f32; 6 * 16]);
                let mut c = Sums([0.0; 6 * 16]);
                let a = t.a;
                std::arch::asm!(
                    "vxorps ymm4, ymm4, ymm4",
                    "vxorps ymm5, ymm5, ymm5",
                    "vxorps ymm6, ymm6, ymm6",
                    "vxorps ymm7, ymm7, ymm7",
                    "vxorps ymm8, ymm8, ymm8",
                    "vxorps ymm9, ymm9, ymm9",
                    "vxorps ymm10, ymm10, ymm10",
                    "vxorps ymm11, ymm11, ymm11",
                    "vxorps ymm12, ymm12, ymm12",
                    "vxorps ymm13, ymm13, ymm13",
                    "vxorps ymm14, ymm14, ymm14",
                    "vxorps ymm15, ymm15, ymm15",
                    // An odd step first (the products stay in order), then pairs.
                    "test {n}, 1",
                    "jz 4f",
                    k256_step!("0", "0"),
                    concat!("add {b0}, ", $ks),
                    concat!("add {b1}, ", $ks),
                    "add {w}, 64",
                    "4:",
                    "shr {n}, 1",
                    "jz 3f",
                    "2:",
                    k256_step!("0", "0"),
                    "prefetcht1 [{ahead}]",
                    k256_step!($ks, "64"),
                    "add {ahead}, 32",
                    concat!("add {b0}, ", $ks2),
                    concat!("add {b1}, ", $ks2),
                    "add {w}, 128",
                    "dec {n}",
                    "jnz 2b",
                    "3:",
                    "vmovups ymmword ptr [{c} + 0], ymm4",
                    "vmovups ymmword ptr [{c} + 32], ymm5",
                    "vmovups ymmword ptr [{c} + 64], ymm6",
                    "vmovups ymmword ptr [{c} + 96], ymm7",
                    "vmovups ymmword ptr [{c} + 128], ymm8",
                    "vmovups ymmword ptr [{c} + 160], ymm9",
                    "vmovups ymmword ptr [{c} + 192], ymm10",
                    "vmovups ymmword ptr [{c} + 224], ymm11",
                    "vmovups ymmword ptr [{c} + 256], ymm12",
                    "vmovups ymmword ptr [{c} + 288], ymm13",
                    "vmovups ymmword ptr [{c} + 320], ymm14",
                    "vmovups ymmword ptr [{c} + 352], ymm15",
                    b0 = inout(reg) a => _,
                    b1 = inout(reg) a.add(3 * t.row_step) => _,
                    rs = in(reg) t.row_step * 4,
                    w = inout(reg) t.w => _,
                    n = inout(reg) t.kc => _,
                    ahead = inout(reg) t.ahead => _,
                    c = in(reg) c.0.as_mut_ptr(),
                    pf = const PREFETCH_FLOATS * 4,
                    out("ymm0") _,
                    out("ymm1") _,
                    out("ymm2") _,
                    out("ymm3") _,
                    out("ymm4") _,
                    out("ymm5") _,
                    out("ymm6") _,
                    out("ymm7") _,
                    out("ymm8") _,
                    out("ymm9") _,
                    out("ymm10") _,
                    out("ymm11") _,
                    out("ymm12") _,
                    out("ymm13") _,
                    out("ymm14") _,
                    out("ymm15") _,
                    options(nostack),
                );
                let m0 = lane_mask(t.valid.min(8));
                let m1 = lane_mask(t.valid.saturating_sub(8).min(8));
                let (b0, b1) = (_mm256_loadu_ps(t.bias), _mm256_loadu_ps(t.bias.add(8)));
                let (f0, f1) = (t.valid >= 8, t.valid >= 16);
                for i in 0..6 {
                    let row = c.0.as_ptr().add(i * 16);
                    finish256(t, i * t.n, m0, f0, _mm256_load_ps(row), b0);
                    if t.valid > 8 {
                        finish256(t, i * t.n + 8, m1, f1, _mm256_load_ps(row.add(8)), b1);
                    }
                }
            }
        };
    }

    k256_asm_tile!(k256_asm_in_place, "4", "8");
    k256_asm_tile!(k256_asm_in_tiles, "24", "48");

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn k256<const R: usize>(t: &Tile) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let (w, rs, ks) = (t.w, t.row_step, t.k_step);
        for kk in 0..t.kc {
            let b0 = _mm256_loadu_ps(w.add(kk * 16));
            let b1 = _mm256_loadu_ps(w.add(kk * 16 + 8));
            prefetch_panel(w.add(kk * 16), 1);
            let a = t.a.add(kk * ks);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(i * rs));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        // As in `k512`: constant indices, the epilogue vectorised (it was a scalar loop
        // through a buffer, with a scalar GELU per output).
        let m0 = lane_mask(t.valid.min(8));
        let m1 = lane_mask(t.valid.saturating_sub(8).min(8));
        let (b0, b1) = (_mm256_loadu_ps(t.bias), _mm256_loadu_ps(t.bias.add(8)));
        let (f0, f1) = (t.valid >= 8, t.valid >= 16);
        for (i, row) in acc.iter().enumerate() {
            finish256(t, i * t.n, m0, f0, row[0], b0);
            if t.valid > 8 {
                finish256(t, i * t.n + 8, m1, f1, row[1], b1);
            }
        }
    }

    /// Lanes `0..valid` set (`valid` ≤ 8), the mask of AVX2's masked loads and stores.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn lane_mask(valid: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(valid as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// 8 floats from `p`: all of them when `full`, else the lanes of `mask` (zeros
    /// elsewhere). Masked moves are slow on AMD, so only a panel's ragged edge uses them.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn load8(p: *const f32, mask: __m256i, full: bool) -> __m256 {
        if full {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, mask)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn store8(p: *mut f32, mask: __m256i, full: bool, v: __m256) {
        if full {
            _mm256_storeu_ps(p, v)
        } else {
            _mm256_maskstore_ps(p, mask, v)
        }
    }

    /// `finish512` for 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn finish256(t: &Tile, at: usize, mask: __m256i, full: bool, acc: __m256, bias: __m256) {
        let mut y = acc;
        if !t.first {
            y = _mm256_add_ps(y, load8(t.out.add(at), mask, full));
        }
        if t.last {
            y = _mm256_add_ps(y, bias);
            if t.gelu {
                y = gelu256(y);
            }
            if !t.res.is_null() {
                y = _mm256_add_ps(y, load8(t.res.add(at), mask, full));
            }
        }
        store8(t.out.add(at), mask, full, y);
    }

    /// [`gelu512`] on 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn gelu256(x: __m256) -> __m256 {
        let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let z = _mm256_max_ps(_mm256_set1_ps(-4.0), _mm256_min_ps(z, _mm256_set1_ps(4.0)));
        let z2 = _mm256_mul_ps(z, z);
        let mut p = _mm256_set1_ps(-2.726_142_3e-10);
        for c in ERF_P {
            p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(c));
        }
        let mut q = _mm256_set1_ps(-1.456_607_2e-5);
        for c in ERF_Q {
            q = _mm256_fmadd_ps(q, z2, _mm256_set1_ps(c));
        }
        let erf = _mm256_div_ps(_mm256_mul_ps(z, p), q);
        let half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5));
        _mm256_fmadd_ps(half_x, erf, half_x)
    }
}

/// Rows per task when a whole product is split over the pool.
const PAR_ROWS: usize = 48;

/// `epi(x Wᵀ)` for all `m` rows, split into row blocks and column units so that every
/// thread has several tasks.
pub fn par_forward(lin: &dyn RowLinear, x: &[f32], m: usize, epi: &Epilogue) -> Vec<f32> {
    assert_eq!(x.len(), m * lin.k(), "input shape");
    let n = lin.n();
    let mut out = vec![0f32; m * n];
    let threads = rayon::current_num_threads().max(1);
    let row_blocks = m.div_ceil(PAR_ROWS).max(1);
    let parts = (4 * threads).div_ceil(row_blocks).clamp(1, lin.units());
    let per = lin.units().div_ceil(parts);
    let ptr = SendPtr(out.as_mut_ptr());
    (0..row_blocks * parts).into_par_iter().for_each(|t| {
        let (rb, part) = (t / parts, t % parts);
        let r0 = rb * PAR_ROWS;
        let rows = PAR_ROWS.min(m.saturating_sub(r0));
        let units = part * per..((part + 1) * per).min(lin.units());
        if rows == 0 || units.is_empty() {
            return;
        }
        let ptr = &ptr;
        let epi = match epi {
            Epilogue::BiasResidual(r) => Epilogue::BiasResidual(&r[r0 * n..]),
            Epilogue::Bias => Epilogue::Bias,
            Epilogue::BiasGelu => Epilogue::BiasGelu,
        };
        // SAFETY: tasks write disjoint (row block, column units) parts of `out`.
        unsafe { lin.run(&x[r0 * lin.k()..], rows, ptr.0.add(r0 * n), &epi, units) };
    });
    out
}

/// candle op for a [`RowLinear`]: `x (.., k)` f32 contiguous on CPU → `(.., n)`.
pub(crate) fn cpu_fwd_linear(
    lin: &dyn RowLinear,
    name: &str,
    storage: &CpuStorage,
    layout: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = super::ops::contiguous_f32(name, storage, layout)?;
    let dims = layout.shape().dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("{name}: scalar input");
    };
    if k != lin.k() {
        candle_core::bail!("{name}: input has {k} features, layer wants {}", lin.k());
    }
    let m: usize = lead.iter().product();
    let y = par_forward(lin, x, m, &Epilogue::Bias);
    let mut out_dims = lead.to_vec();
    out_dims.push(lin.n());
    Ok((CpuStorage::F32(y), Shape::from(out_dims)))
}

/// candle's `CustomOp1` for a [`RowLinear`] type, named `$name`: `x (.., k)` f32
/// contiguous on CPU → `(.., n)` (the padded forward pass calls the layers this way).
macro_rules! cpu_linear_op {
    ($ty:ty, $name:literal) => {
        impl candle_core::CustomOp1 for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                storage: &candle_core::CpuStorage,
                layout: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                $crate::embed::gemm::cpu_fwd_linear(self, $name, storage, layout)
            }
        }
    };
}
pub(crate) use cpu_linear_op;

cpu_linear_op!(PackedLinear, "streambed-f32-linear");

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_environment_picks_a_kernel_this_processor_runs() {
        // A variable of this test's own: no other test reads it.
        const VAR: &str = "STREAMBED_TEST_PICK_KERNEL";
        let runs = [Isa::Avx512, Isa::Avx2, Isa::Portable];
        std::env::remove_var(VAR);
        assert_eq!(
            pick_by_env(VAR, &runs, Isa::name),
            Isa::Avx512,
            "unset: the best"
        );
        std::env::set_var(VAR, " AVX2 ");
        assert_eq!(
            pick_by_env(VAR, &runs, Isa::name),
            Isa::Avx2,
            "named, any case"
        );
        std::env::set_var(VAR, "portable");
        assert_eq!(pick_by_env(VAR, &runs, Isa::name), Isa::Portable);
        std::env::set_var(VAR, "avx512");
        let without = [Isa::Avx2, Isa::Portable];
        assert_eq!(
            pick_by_env(VAR, &without, Isa::name),
            Isa::Avx2,
            "not run here: the best"
        );
        std::env::set_var(VAR, "sse");
        assert_eq!(
            pick_by_env(VAR, &runs, Isa::name),
            Isa::Avx512,
            "unknown: the best"
        );
        std::env::remove_var(VAR);
    }

    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Split over the pool, from rows read in place or packed once for all the parts,
    /// every kernel gives what one call over all the units gives; with two depth
    /// chunks (k = 2048 > KC) and any number of parts.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_assembly_tiles_equal_the_compiled_ones() {
        type Kernel = unsafe fn(&Tile);
        let mut tiles: Vec<(&str, usize, usize, Kernel, Kernel)> = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            tiles.push(("avx512", 12, 32, x86::k512_asm, x86::k512::<12>));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            tiles.push(("avx2", 6, 16, x86::k256_asm, x86::k256::<6>));
        }
        // An odd depth and an even one: the AVX-512 tile takes its steps in pairs.
        for ((name, mr, nr, asm, compiled), kc) in
            tiles.into_iter().flat_map(|tile| [(tile, 44), (tile, 45)])
        {
            let n = nr + 8;
            let mut seed = 11u64;
            let x: Vec<f32> = (0..mr * kc).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..nr * kc).map(|_| lcg(&mut seed)).collect();
            let bias: Vec<f32> = (0..nr).map(|_| lcg(&mut seed)).collect();
            let res: Vec<f32> = (0..mr * n).map(|_| lcg(&mut seed)).collect();
            let partial: Vec<f32> = (0..mr * n).map(|_| lcg(&mut seed)).collect();
            // Rows in place (stride kc) and packed (`[kc][mr]`), every epilogue, partial
            // panels, a chunk after the first.
            for (row_step, k_step) in [(kc, 1), (1, mr)] {
                for valid in [nr, nr - 5, nr / 2, 3] {
                    for (first, last, gelu, with_res) in [
                        (true, true, false, false),
                        (true, true, true, false),
                        (false, true, false, true),
                        (false, false, false, false),
                    ] {
                        let run = |kernel: Kernel| {
                            let mut out = partial.clone();
                            let t = Tile {
                                a: x.as_ptr(),
                                row_step,
                                k_step,
                                kc,
                                w: w.as_ptr(),
                                out: out.as_mut_ptr(),
                                n,
                                valid,
                                first,
                                last,
                                bias: bias.as_ptr(),
                                res: if with_res {
                                    res.as_ptr()
                                } else {
                                    std::ptr::null()
                                },
                                gelu,
                                ahead: w.as_ptr(),
                            };
                            // SAFETY: the features were detected; mr rows of kc, a panel
                            // of kc × nr, mr output rows of n.
                            unsafe { kernel(&t) };
                            out
                        };
                        let (a, c) = (run(asm), run(compiled));
                        assert!(
                            a.iter().zip(&c).all(|(a, c)| a.to_bits() == c.to_bits()),
                            "{name}: rows {row_step}/{k_step}, valid {valid}, first {first} last {last}"
                        );
                    }
                }
            }
        }
    }

    /// The first four tiles over a panel cover the next panel's chunk in quarters, in
    /// order; later tiles, and a range's last panel, point at their own panel.
    #[test]
    fn tiles_ask_for_the_next_panel_in_quarters() {
        let w = vec![0f32; 4096];
        let base = w.as_ptr();
        let (panel, chunk) = (1024, 512);
        for tile in 0..4 {
            let got = next_panel_ahead(base, panel, chunk, true, tile);
            assert_eq!(
                got,
                base.wrapping_add(panel + tile * chunk / 4),
                "tile {tile}"
            );
        }
        assert_eq!(next_panel_ahead(base, panel, chunk, true, 4), base);
        assert_eq!(next_panel_ahead(base, panel, chunk, true, 13), base);
        assert_eq!(next_panel_ahead(base, panel, chunk, false, 0), base);
    }

    #[test]
    fn split_runs_equal_one_run() {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if isa() != Isa::Portable {
            isas.push(isa());
        }
        for isa in isas {
            // The last: rows in several blocks of `row_block` (84 rows a 1536-deep chunk),
            // the last block short and not whole tiles.
            for (m, n, k) in [(45, 70, 96), (29, 40, 2048), (199, 40, 3072)] {
                let mut seed = (m + n + k) as u64;
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
                let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                let mut lin = PackedLinear::with_isa(&w, &b, n, k, isa);
                for pack_rows in [false, true] {
                    lin.pack_rows = pack_rows;
                    let epi = Epilogue::BiasResidual(&res);
                    let mut whole = vec![0f32; m * n];
                    // SAFETY: m rows of k in, m rows of n out, here and below.
                    unsafe { lin.run(&x, m, whole.as_mut_ptr(), &epi, 0..lin.units()) };
                    let want = reference(&x, &w, &b, m, n, k);
                    for (i, (g, r)) in whole.iter().zip(&want).enumerate() {
                        let r = (r + res[i] as f64) as f32;
                        assert!(
                            (g - r).abs() < 1e-3,
                            "{isa:?} {m}x{n}x{k} at {i}: {g} vs {r}"
                        );
                    }
                    for parts in [2, 3, lin.units() + 1] {
                        let mut split = vec![f32::NAN; m * n];
                        unsafe { lin.run_split(&x, m, split.as_mut_ptr(), &epi, parts) };
                        assert_eq!(
                            split, whole,
                            "{isa:?} {m}x{n}x{k} packed {pack_rows}, {parts} parts"
                        );
                    }
                }
            }
        }
    }

    /// `x Wᵀ + b` in f64, the tests' reference for every kernel.
    pub(crate) fn reference(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        m: usize,
        n: usize,
        k: usize,
    ) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for c in 0..n {
                let mut s = b[c] as f64;
                for t in 0..k {
                    s += x[i * k + t] as f64 * w[c * k + t] as f64;
                }
                y[i * n + c] = s;
            }
        }
        y
    }

    fn gelu64(x: f64) -> f64 {
        // erf by its series, enough terms for |x| < 6.
        let z = x / std::f64::consts::SQRT_2;
        let erf = if z.abs() > 4.5 {
            z.signum()
        } else {
            let (mut term, mut sum) = (z, z);
            for i in 1..120 {
                term *= -z * z / i as f64;
                sum += term / (2 * i + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        0.5 * x * (1.0 + erf)
    }

    /// Every kernel this processor has, odd shapes (rows past a tile, columns past a
    /// panel), each epilogue, against an f64 reference.
    #[test]
    fn every_kernel_and_epilogue_matches_f64() {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        for &isa in &isas {
            // The last two: deeper than KC (partial sums carried over chunks), and rows
            // packed (k a multiple of 1024).
            for &(m, n, k) in &[
                (1, 16, 4),
                (13, 50, 37),
                (70, 131, 96),
                (25, 384, 384),
                (14, 40, 2 * KC + 5),
                (30, 70, 2048),
            ] {
                let mut seed = (m * 1000 + n * 10 + k) as u64;
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.2).collect();
                let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
                let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                let lin = PackedLinear::with_isa(&w, &b, n, k, isa);
                let want = reference(&x, &w, &b, m, n, k);
                for epi in [
                    Epilogue::Bias,
                    Epilogue::BiasGelu,
                    Epilogue::BiasResidual(&res),
                ] {
                    let got = par_forward(&lin, &x, m, &epi);
                    for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                        let r = match epi {
                            Epilogue::Bias => r,
                            Epilogue::BiasGelu => gelu64(r),
                            Epilogue::BiasResidual(res) => r + res[i] as f64,
                        };
                        assert!(
                            (g as f64 - r).abs() < 1e-4 * r.abs().max(1.0),
                            "{isa:?} {m}x{n}x{k} at {i}: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }
}
