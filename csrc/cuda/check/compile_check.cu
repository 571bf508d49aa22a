// Compile check of csrc/cuda/rmi_kernels.cuh without torch: instantiates every kernel template
// (device code) and every host-side helper for the logits types float, double, __half and
// __nv_bfloat16 and the label types uint8, int32, int64: the combinations rmi_cuda.cu
// dispatches (int8/int16 labels go through an int32 copy there). Not part of the extension
// (setup.py globs csrc/cuda/*.cu only); tests/test_cuda.py runs
//   nvcc -std=c++17 -c -O3 -I csrc -gencode arch=compute_80,code=sm_80 \
//        -gencode arch=compute_90,code=sm_90 -Xptxas -v csrc/cuda/check/compile_check.cu
// and reads ptxas' registers, spills and stack frame of every kernel from its output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/rmi_kernels.cuh"

namespace rmi {
namespace cuda {
namespace {

// Taking a function's address instantiates it.
template <typename scalar_t, typename acc_t, typename label_t>
void instantiate_with_labels() {
  const void* kernels[] = {
      reinterpret_cast<const void*>(&base_stats_kernel<scalar_t, acc_t, label_t>),
      reinterpret_cast<const void*>(&pooled_maps_kernel<scalar_t, acc_t, label_t, kAvgPool>),
      reinterpret_cast<const void*>(&pooled_maps_kernel<scalar_t, acc_t, label_t, kMaxPool>),
      reinterpret_cast<const void*>(&pooled_maps_kernel<scalar_t, acc_t, label_t, kInterp>),
      reinterpret_cast<const void*>(&full_grad_kernel<scalar_t, acc_t, label_t>),
  };
  (void)kernels;
  // Host side of the per-element functions (what check/emulate.cu runs).
  auto stats = &base_stats_at<acc_t, scalar_t, label_t>;
  auto avg = &pooled_store<kAvgPool, acc_t, scalar_t, label_t>;
  auto max = &pooled_store<kMaxPool, acc_t, scalar_t, label_t>;
  auto interp = &pooled_store<kInterp, acc_t, scalar_t, label_t>;
  auto grad = &full_grad_store<acc_t, scalar_t, label_t>;
  (void)stats, (void)avg, (void)max, (void)interp, (void)grad;
}

template <typename scalar_t, typename acc_t>
void instantiate() {
  instantiate_with_labels<scalar_t, acc_t, uint8_t>();
  instantiate_with_labels<scalar_t, acc_t, int32_t>();
  instantiate_with_labels<scalar_t, acc_t, int64_t>();
  const void* kernels[] = {
      reinterpret_cast<const void*>(&logsumexp_kernel<scalar_t, acc_t>),
      reinterpret_cast<const void*>(&plane_offsets_kernel<acc_t>),
      reinterpret_cast<const void*>(&moment_partials_kernel<acc_t>),
      reinterpret_cast<const void*>(&pooled_grad_kernel<acc_t>),
      reinterpret_cast<const void*>(&base_stats_final_kernel),
      reinterpret_cast<const void*>(&moment_finalize_kernel),
  };
  (void)kernels;
  auto lse = &logsumexp_at<acc_t, scalar_t>;
  auto partial = &moment_partial_at<acc_t>;
  auto stencil = &pooled_grad_store<acc_t>;
  auto adjoint = &pool_adjoint_at<acc_t>;
  (void)lse, (void)partial, (void)stencil, (void)adjoint;
}

}  // namespace

// Host-side, launch-free helpers, called the way rmi_cuda.cu calls them.
LaunchPlan check_host_helpers() {
  const int64_t sizes[4] = {2, 3, 17, 19}, x_strides[4] = {969, 323, 19, 1};
  const int64_t l_strides[3] = {323, 19, 1};
  Problem g = make_problem(sizes, x_strides, l_strides, 3, 4, kAvgPool, 4, 255, kSigmoidMode);
  LaunchPlan plan = plan_launches(g);
  const Divisors dv = make_divisors(g);
  plan.moments.chunks += dv.W.div(grid_blocks(g.N * g.C * g.h * g.w));
  return plan;
}

void check_instantiations() {
  instantiate<float, float>();
  instantiate<double, double>();
  instantiate<__half, float>();
  instantiate<__nv_bfloat16, float>();
}

}  // namespace cuda
}  // namespace rmi
