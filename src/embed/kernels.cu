// Fused elementwise kernels for the f16 BERT forward on CUDA. candle adds a bias with a
// generic strided broadcast kernel, which took over half of the GPU time (docs/PERFORMANCE.md);
// these read the row-major activation once and the bias by column, and compute in f32.
#include <cuda_fp16.h>

#define GRID_STRIDE(i, n) \
  for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

extern "C" __global__ void bias_add_f16(const __half* x, const __half* b, __half* out,
                                        unsigned int n, unsigned int cols) {
  GRID_STRIDE(i, n) { out[i] = __float2half(__half2float(x[i]) + __half2float(b[i % cols])); }
}

extern "C" __global__ void bias_residual_f16(const __half* x, const __half* b, const __half* r,
                                             __half* out, unsigned int n, unsigned int cols) {
  GRID_STRIDE(i, n) {
    out[i] = __float2half(__half2float(x[i]) + __half2float(b[i % cols]) + __half2float(r[i]));
  }
}

extern "C" __global__ void bias_gelu_f16(const __half* x, const __half* b, __half* out,
                                         unsigned int n, unsigned int cols) {
  GRID_STRIDE(i, n) {
    float v = __half2float(x[i]) + __half2float(b[i % cols]);
    out[i] = __float2half(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
  }
}
