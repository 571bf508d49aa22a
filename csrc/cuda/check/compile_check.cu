// Compile check of csrc/cuda/rmi_kernels.cuh without torch: instantiates every kernel template
// (device code) and every host-side helper for the logits types float, double, __half and
// __nv_bfloat16 and the label types uint8, int32, int64. Not part of the extension (setup.py
// globs csrc/cuda/*.cu only); tests/test_cuda.py runs
//   nvcc -std=c++17 -c -I csrc csrc/cuda/check/compile_check.cu -o /tmp/...
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
      reinterpret_cast<const void*>(&pooled_maps_kernel<scalar_t, acc_t, label_t>),
      reinterpret_cast<const void*>(&full_grad_kernel<scalar_t, acc_t, label_t>),
  };
  (void)kernels;
  // Host side of the per-element functions (what check/emulate.cu runs).
  auto stats = &base_stats_at<acc_t, scalar_t, label_t>;
  auto pooled = &pooled_store<acc_t, scalar_t, label_t>;
  auto adjoint = &pool_adjoint_at<acc_t, scalar_t, label_t>;
  auto grad = &full_grad_store<acc_t, scalar_t, label_t>;
  (void)stats, (void)pooled, (void)adjoint, (void)grad;
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
  (void)lse, (void)partial, (void)stencil;
}

}  // namespace

// Host-side, launch-free helpers, called the way rmi_cuda.cu calls them.
MomentPlan check_host_helpers() {
  const int64_t sizes[4] = {2, 3, 17, 19}, x_strides[4] = {969, 323, 19, 1};
  const int64_t l_strides[3] = {323, 19, 1};
  Problem g = make_problem(sizes, x_strides, l_strides, 3, 4, kAvgPool, 4, 255, kSigmoidMode);
  unsigned int blocks = grid_blocks(g.N * g.C * g.h * g.w) + reduce_blocks(g.N * g.H * g.W);
  MomentPlan plan = plan_moments(g.N * g.C, g.h - g.radius + 1, g.radius * g.radius);
  plan.chunks += blocks;
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
