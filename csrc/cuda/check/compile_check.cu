// Compile check of csrc/cuda/rmi_kernels.cuh without torch: instantiates every kernel template
// (device code) and every host-side helper for the logits types float, double, __half and
// __nv_bfloat16 and the targets LabelTarget<uint8, int32, int64>, FloatTarget<the logits'
// type or the compute type> and RegionTarget<the compute type>: the combinations rmi_cuda.cu dispatches (int8/int16 labels go
// through an int32 copy there, float targets of another dtype through a compute-type copy).
// Not part of the extension (setup.py globs csrc/cuda/*.cu only); tests/test_cuda.py runs
//   nvcc -std=c++17 -c -O3 -I csrc -gencode arch=compute_80,code=sm_80 \
//        -gencode arch=compute_90,code=sm_90 -Xptxas -v csrc/cuda/check/compile_check.cu
// and reads ptxas' registers, spills and stack frame of every kernel from its output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/rmi_kernels.cuh"

namespace rmi {
namespace cuda {
namespace {

// Taking a function's address instantiates it.
template <typename scalar_t, typename acc_t, typename Target, int kind>
void instantiate_pool_kind() {
  const void* kernels[] = {
      reinterpret_cast<const void*>(&pooled_maps_kernel<scalar_t, acc_t, Target, kind>),
      reinterpret_cast<const void*>(&moment_sums_offsets_kernel<scalar_t, acc_t, Target, kind>),
      reinterpret_cast<const void*>(&moment_sums_partials_kernel<scalar_t, acc_t, Target, kind>),
  };
  (void)kernels;
  // Host side of the per-element functions (what check/emulate.cu runs).
  auto store = &pooled_maps_store<kind, acc_t, scalar_t, Target>;
  auto py = &pooled_py<kind, acc_t, scalar_t, Target>;
  auto sums = &plane_sums_at<kind, acc_t, scalar_t, Target>;
  auto stage = &moment_stage_at<kind, acc_t, scalar_t, Target>;
  (void)store, (void)py, (void)sums, (void)stage;
}

template <typename scalar_t, typename acc_t, typename Target>
void instantiate_with_target() {
  instantiate_pool_kind<scalar_t, acc_t, Target, kAvgPool>();
  instantiate_pool_kind<scalar_t, acc_t, Target, kMaxPool>();
  instantiate_pool_kind<scalar_t, acc_t, Target, kInterp>();
  const void* kernels[] = {
      reinterpret_cast<const void*>(&first_term_kernel<scalar_t, acc_t, Target>),
      reinterpret_cast<const void*>(&first_term_lse_kernel<scalar_t, acc_t, Target>),
      reinterpret_cast<const void*>(&full_res_grad_kernel<scalar_t, acc_t, Target, true>),
      reinterpret_cast<const void*>(&full_res_grad_kernel<scalar_t, acc_t, Target, false>),
  };
  (void)kernels;
  auto first_term = &first_term_at<acc_t, scalar_t, Target>;
  auto lse = &first_term_lse_store<acc_t, scalar_t, Target>;
  auto fused = &full_res_grad_store<true, acc_t, scalar_t, Target>;
  auto grad = &full_res_grad_store<false, acc_t, scalar_t, Target>;
  auto pixels = &stencil_at<PixelSource<acc_t, scalar_t, Target>>;
  (void)first_term, (void)lse, (void)fused, (void)grad, (void)pixels;
}

template <typename scalar_t, typename acc_t>
void instantiate() {
  instantiate_with_target<scalar_t, acc_t, LabelTarget<uint8_t>>();
  instantiate_with_target<scalar_t, acc_t, LabelTarget<int32_t>>();
  instantiate_with_target<scalar_t, acc_t, LabelTarget<int64_t>>();
  // Float targets: read in the logits' type, or (any other float dtype) in the compute type.
  instantiate_with_target<scalar_t, acc_t, FloatTarget<scalar_t>>();
  if constexpr (!std::is_same<scalar_t, acc_t>::value)
    instantiate_with_target<scalar_t, acc_t, FloatTarget<acc_t>>();
  instantiate_with_target<scalar_t, acc_t, RegionTarget<acc_t>>();  // region_mi
  const void* kernels[] = {
      reinterpret_cast<const void*>(&pooled_grad_stencil_kernel<acc_t>),
      reinterpret_cast<const void*>(&first_term_final_kernel),
      reinterpret_cast<const void*>(&moment_sums_finalize_kernel),
  };
  (void)kernels;
  auto lse = &logsumexp_at<acc_t, scalar_t>;
  auto accumulate = &moment_tile_accumulate;
  auto stencil = &pooled_grad_stencil_store<acc_t>;
  auto maps = &stencil_at<MapSource<acc_t>>;
  auto adjoint = &pool_adjoint_at<acc_t>;
  (void)lse, (void)accumulate, (void)stencil, (void)maps, (void)adjoint;
}

}  // namespace

// Host-side, launch-free helpers, called the way rmi_cuda.cu calls them.
LaunchPlan check_host_helpers() {
  const int64_t sizes[4] = {2, 3, 17, 19}, x_strides[4] = {969, 323, 19, 1};
  const int64_t l_strides[3] = {323, 19, 1};
  Problem g =
      make_planar_problem(sizes, x_strides, l_strides, 3, 4, kAvgPool, 4, 255, kSigmoidMode);
  LaunchPlan plan = plan_launches(g);
  const Divisors dv = make_divisors(g);
  const BackwardPlan bp = plan_backward(g, 2, 4, true);
  const PlaneBlock blk = block_of(g, bp, bp.blocks - 1);
  plan.moments.chunks += dv.W.div(bp.pooled_blocks) + blk.channel_div.div(bp.full_blocks);
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
