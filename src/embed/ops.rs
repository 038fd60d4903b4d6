//! CPU kernels that candle runs through scalar libm calls: GELU's erf. Ours is a rational
//! approximation without calls, so the loop vectorises, compiled for AVX-512 or AVX2 when
//! the processor has them (checked at run time).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};

/// erf(x) as an odd rational function on [-4, 4] (outside, erf is ±1 in f32). The
/// coefficients are the standard minimax fit used by several numerics libraries;
/// absolute error is about 1e-7.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.9546e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// Exact-form GELU of one value, x/2 * (1 + erf(x / sqrt 2)).
#[inline(always)]
pub(crate) fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_loop(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = gelu(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_avx512(x: &[f32], out: &mut [f32]) {
    gelu_loop(x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(x: &[f32], out: &mut [f32]) {
    gelu_loop(x, out)
}

/// Exact-form GELU, x/2 * (1 + erf(x / sqrt 2)), on f32.
pub fn gelu_erf_f32(x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected on this processor.
            return unsafe { gelu_avx512(x, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected on this processor.
            return unsafe { gelu_avx2(x, out) };
        }
    }
    gelu_loop(x, out)
}

/// The sum, in 16 lanes so it vectorises (a float sum in one lane is a serial chain).
#[inline(always)]
pub(crate) fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let whole = x.len() / 16 * 16;
    for c in x[..whole].chunks_exact(16) {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + x[whole..].iter().sum::<f32>()
}

/// An output buffer handed to a thread pool's tasks, each of which writes a disjoint part
/// of it (the users say which, at each `unsafe` write).
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint parts of one live buffer to the pool's threads.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// The f32 values a CPU custom op reads: its input must be contiguous f32 (our ops are
/// only applied where the model runs in f32 on the CPU).
pub(crate) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        candle_core::bail!("{op}: f32 input only");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only");
    };
    Ok(&v[start..end])
}

/// candle op wrapper: f32 on CPU only (callers fall back to candle's own otherwise).
pub struct FastGelu;

impl CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "streambed-gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(self.name(), storage, layout)?;
        let mut out = vec![0f32; x.len()];
        gelu_erf_f32(x, &mut out);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0f32;
        for i in -8000..=8000 {
            let x = i as f32 / 1000.0;
            let e = (erf(x) - libm_erf(x)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 2e-6, "max error {worst}");
    }

    fn libm_erf(x: f32) -> f32 {
        // Reference through candle's own (libm) GELU: erf(x) = 2 gelu(x√2)/(x√2) - 1.
        let t =
            candle_core::Tensor::new(&[x * std::f32::consts::SQRT_2], &candle_core::Device::Cpu)
                .unwrap()
                .gelu_erf()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0];
        if x == 0.0 {
            0.0
        } else {
            2.0 * t / (x * std::f32::consts::SQRT_2) - 1.0
        }
    }

    #[test]
    fn gelu_kernel_matches_candle() {
        let xs: Vec<f32> = (-500..500).map(|i| i as f32 / 50.0).collect();
        let mut ours = vec![0.0; xs.len()];
        gelu_erf_f32(&xs, &mut ours);
        let theirs = candle_core::Tensor::new(xs.as_slice(), &candle_core::Device::Cpu)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
