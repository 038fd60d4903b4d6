//! Intel AMX tiles for the int8 linear layers (`qlinear`): the one place with assembly.
//!
//! AMX adds eight tile registers of up to 16 rows × 64 bytes and `tdpbusd`, which adds
//! the products of a 16 × 64 tile of u8 rows and a 16 × 64 tile of i8 weights (16
//! channels, four inputs each: the layout the VNNI kernel already packs) into a 16 × 16
//! tile of i32 sums: 16,384 multiply-adds an instruction, 64 times a `vpdpbusd`, and the
//! same integers (u8·i8 summed in i32, no saturation).
//!
//! Rust has no stable AMX intrinsics, so the kernel is `asm!`. The compiler never uses
//! tile registers itself, so their state is ours between the configuration and the
//! release, which both happen inside one sequential call on one thread.
//!
//! Linux hands out the tile state only to a process that asks (`arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`); [`available`] asks once and says no when the kernel refuses.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;

/// Rows of an A tile (and of a C tile).
pub const ROWS: usize = 16;
/// Bytes of a row of an A tile: 64 inputs.
pub const K_STEP: usize = 64;
/// Rows and channels one call of [`tile_32x32`] computes.
pub const TILE: usize = 32;

/// Bytes of a cache line: AMX loads tiles whose rows start on one (measured on Intel Xeon
/// with AMX: 2.6 ns a tile aligned, 16.6 ns one byte off), so packed weights and prepared
/// rows start on a line and their rows (a multiple of 64 bytes) keep it.
pub const LINE: usize = 64;

/// The first index of `v` on a 64-byte line (`v` must hold `LINE` bytes more than used).
pub fn aligned<T>(v: &[T]) -> usize {
    (LINE - v.as_ptr() as usize % LINE) % LINE / std::mem::size_of::<T>()
}

/// Whether this processor has AMX with int8 and the operating system lets this process
/// use it (asked once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| has(25) && permitted())
}

/// Whether this processor has AMX with bf16 (`tdpbf16ps`) and this process may use it.
pub fn available_bf16() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| has(22) && permitted())
}

/// Whether CPUID leaf 7 reports tiles (EDX bit 24) and the AMX feature at EDX bit `bit`
/// (22 bf16, 25 int8).
fn has(bit: u32) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Leaf 7 exists on every processor with AVX-512 (checked first), and the kernels
        // around the tiles are AVX-512.
        if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx512bw") {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        edx >> 24 & 1 == 1 && edx >> bit & 1 == 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = bit;
        false
    }
}

/// Asks Linux for the tile state for this process (once; false where it refuses).
fn permitted() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                )
            };
            r == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        false
    })
}

/// The tile configuration every call uses: tiles 0–3 the 16 × 16 i32 sums, 4–5 two
/// 16-row blocks of activations, 6–7 two blocks of 16 channels' weights; all 16 rows of
/// 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1; // palette 1
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
        c[48 + t] = ROWS as u8;
        t += 1;
    }
    Config(c)
};

/// Loads the tile configuration on this thread: call before [`tile_32x32`], and
/// [`release`] after the last call.
///
/// # Safety
/// [`available`] must have returned true.
#[cfg(target_arch = "x86_64")]
pub unsafe fn configure() {
    asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
}

/// Gives the tile state back (the next context switch need not save it).
///
/// # Safety
/// As [`configure`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// `c[t][r][j] = Σ_k a[r'][k] · w[j'][k]` for 32 rows and 32 channels, as four 16 × 16
/// i32 tiles: `t = 2·(row block) + (channel block)`.
///
/// `a` is 32 rows of `k_steps · 64` u8 inputs, `a_stride` bytes apart; `w0` and `w1`
/// are two blocks of 16 channels in the VNNI layout (`[k/4][16][4]` i8, 64 bytes per
/// four inputs), `k_steps · 1024` bytes each.
///
/// Every row should start on a 64-byte line: a tile load off a line is 6× slower.
///
/// # Safety
/// [`configure`] was called on this thread; the pointers hold what is described.
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_32x32(
    a: *const u8,
    a_stride: usize,
    w0: *const i8,
    w1: *const i8,
    k_steps: usize,
    c: &mut [[i32; ROWS * ROWS]; 4],
) {
    debug_assert!(k_steps > 0);
    let a1 = a.add(ROWS * a_stride);
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        // Tiles are not renamed: each load waits for the products still reading its
        // register, so loads go between products (30% faster than all loads first).
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm6, [{w0} + {sw}*1]",
        "tdpbusd tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{w1} + {sw}*1]",
        "tdpbusd tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tdpbusd tmm2, tmm5, tmm6",
        "tdpbusd tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {w0}, 1024",
        "add {w1}, 1024",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c0} + {sw}*1], tmm0",
        "tilestored [{c1} + {sw}*1], tmm1",
        "tilestored [{c2} + {sw}*1], tmm2",
        "tilestored [{c3} + {sw}*1], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a1 => _,
        w0 = inout(reg) w0 => _,
        w1 = inout(reg) w1 => _,
        n = inout(reg) k_steps => _,
        sa = in(reg) a_stride,
        sw = in(reg) 64usize,
        c0 = in(reg) c[0].as_mut_ptr(),
        c1 = in(reg) c[1].as_mut_ptr(),
        c2 = in(reg) c[2].as_mut_ptr(),
        c3 = in(reg) c[3].as_mut_ptr(),
        options(nostack),
    );
}

/// `c[t] = Σ_k ah·wh + ah·wl + al·wh` for 32 rows and 32 channels in f32, as four
/// 16 × 16 tiles laid out as in [`tile_32x32`]: the f32 product from each value split
/// into a high and a low bf16 (`x ≈ xh + xl`), the low × low term left out (see `split`).
///
/// Per step of 32 inputs, `a` holds each row's 32 high bf16 then its 32 low ones (128
/// bytes; rows `a_stride` bytes apart), and `w` the two blocks of 16 channels' high
/// halves then their low halves, each in the pair layout (`[16][16][2]` bf16, 1024 bytes:
/// 4096 a step).
///
/// # Safety
/// As [`tile_32x32`], on a processor with AMX-BF16 ([`available_bf16`]).
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_32x32_bf16x3(
    a: *const u16,
    a_stride: usize,
    w: *const u16,
    k_steps: usize,
    c: &mut [[f32; ROWS * ROWS]; 4],
) {
    debug_assert!(k_steps > 0);
    let a1 = a.cast::<u8>().add(ROWS * a_stride);
    // Eight tile loads for twelve products: each loaded tile serves two or four.
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        // high rows × low weights
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm6, [{w} + {sw}*1 + 2048]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{w} + {sw}*1 + 3072]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        // high rows (still loaded) × high weights
        "tileloadd tmm6, [{w} + {sw}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{w} + {sw}*1 + 1024]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        // low rows × high weights (still loaded)
        "tileloadd tmm4, [{a0} + {sa}*1 + 64]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1 + 64]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 128",
        "add {a1}, 128",
        "add {w}, 4096",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c} + {sw}*1], tmm0",
        "tilestored [{c} + {sw}*1 + 1024], tmm1",
        "tilestored [{c} + {sw}*1 + 2048], tmm2",
        "tilestored [{c} + {sw}*1 + 3072], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a1 => _,
        w = inout(reg) w => _,
        n = inout(reg) k_steps => _,
        sa = in(reg) a_stride,
        sw = in(reg) 64usize,
        c = in(reg) c.as_mut_ptr(),
        options(nostack),
    );
}

/// `c[t] = Σ_k ah·wh` for 32 rows and 32 channels in f32 (tiles as in [`tile_32x32`]):
/// one bf16 product per input, summed in f32. Per step of 32 inputs, `a` holds each
/// row's 32 bf16 (64 bytes; rows `a_stride` bytes apart) and `w` the two blocks of 16
/// channels in the pair layout (2048 bytes a step).
///
/// # Safety
/// As [`tile_32x32`], on a processor with AMX-BF16 ([`available_bf16`]).
#[cfg(target_arch = "x86_64")]
pub unsafe fn tile_32x32_bf16(
    a: *const u16,
    a_stride: usize,
    w: *const u16,
    k_steps: usize,
    c: &mut [[f32; ROWS * ROWS]; 4],
) {
    debug_assert!(k_steps > 0);
    let a1 = a.cast::<u8>().add(ROWS * a_stride);
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm6, [{w} + {sw}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{w} + {sw}*1 + 1024]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {w}, 2048",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c} + {sw}*1], tmm0",
        "tilestored [{c} + {sw}*1 + 1024], tmm1",
        "tilestored [{c} + {sw}*1 + 2048], tmm2",
        "tilestored [{c} + {sw}*1 + 3072], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a1 => _,
        w = inout(reg) w => _,
        n = inout(reg) k_steps => _,
        sa = in(reg) a_stride,
        sw = in(reg) 64usize,
        c = in(reg) c.as_mut_ptr(),
        options(nostack),
    );
}
