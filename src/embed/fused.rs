//! Fused bias kernels for the f16 forward pass on CUDA (src/embed/kernels.cu): `x + b`,
//! `x + b + r` and `gelu(x + b)` in one pass each, where `x` is a contiguous
//! `(rows, cols)` matmul output and `b` a `(cols,)` bias. Only built with the `cuda`
//! feature and only used for f16 tensors on a GPU; everything else takes candle's ops.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "streambed_fused";

/// Whether `x` can take the fused kernels.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::F16 && x.is_contiguous() && x.rank() == 2
}

fn launch(
    name: &'static str,
    inputs: &[(&CudaStorage, &Layout)],
    cols: usize,
) -> Result<(CudaStorage, Shape)> {
    let (first, first_l) = inputs[0];
    let dev = first.device().clone();
    let n = first_l.shape().elem_count();
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<half::f16>(n)? };
    let views = inputs
        .iter()
        .map(|(s, l)| {
            let slice = s.as_cuda_slice::<half::f16>()?;
            Ok(slice.slice(l.start_offset()..))
        })
        .collect::<Result<Vec<_>>>()?;
    let (n32, cols32) = (n as u32, cols as u32);
    let mut builder = func.builder();
    for v in &views {
        builder.arg(v);
    }
    builder.arg(&out);
    builder.arg(&n32);
    builder.arg(&cols32);
    // SAFETY: the kernel reads n elements of x (and r) and cols of b, writes n of out.
    unsafe { builder.launch(LaunchConfig::for_num_elems(n32)) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        first_l.shape().clone(),
    ))
}

fn no_cpu<T>(name: &str) -> Result<T> {
    Err(candle_core::Error::Msg(format!(
        "{name} runs on CUDA only; the CPU path uses candle's ops"
    )))
}

/// `x + b` or `gelu_erf(x + b)`.
struct BiasOp {
    gelu: bool,
}

impl CustomOp2 for BiasOp {
    fn name(&self) -> &'static str {
        if self.gelu {
            "bias_gelu_f16"
        } else {
            "bias_add_f16"
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        launch(self.name(), &[(x, xl), (b, bl)], xl.dims()[1])
    }
}

/// `x + b + r`.
struct BiasResidual;

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "bias_residual_f16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        launch(self.name(), &[(x, xl), (b, bl), (r, rl)], xl.dims()[1])
    }
}

pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(&b.contiguous()?, &BiasOp { gelu: false })
}

pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(&b.contiguous()?, &BiasOp { gelu: true })
}

pub fn bias_residual(x: &Tensor, b: &Tensor, r: &Tensor) -> Result<Tensor> {
    x.apply_op3_no_bwd(&b.contiguous()?, &r.contiguous()?, &BiasResidual)
}
