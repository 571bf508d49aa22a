// CUDA implementations of the rmi_ext ops (schemas and output contracts: csrc/rmi.cpp; plain
// torch semantics: rmi_ext/torch_backend.py). Torch glue only: argument checks, allocation,
// dtype and target dispatch and launches on the current stream; the kernels are in
// rmi_kernels.cuh. Inputs are read through their strides (copied only for int8/int16 labels,
// float targets of neither the logits' dtype nor the compute type and region_mi targets not in
// the compute type, see kernel_target; a strided mask is made contiguous); the float64
// tiny-matrix stage (c) stays in Python (rmi_ext/linalg.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream, alias of at::cuda's
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "rmi_kernels.cuh"
#include "rmi_ops.h"

namespace rmi {
namespace cuda {
namespace {

using at::Tensor;

// Checks shared by both ops (rmi_ops.h) plus the device and the kernels' planar isotropic
// problem; returns it. Sizes past 2^31 elements (or planes) need no check: indices are int64
// and every grid dimension is capped by plan_launches() (rmi_kernels.cuh), with the kernels
// looping past the caps.
Problem check_cuda_inputs(const char* op, const Tensor& logits, const Tensor& labels,
                          at::IntArrayRef radius, at::IntArrayRef stride, c10::string_view pool,
                          at::IntArrayRef pool_size, int64_t ignore_index,
                          c10::string_view mode, const c10::optional<Tensor>& mask) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  const Problem p = check_inputs(op, logits, labels, radius, stride, pool, pool_size,
                                 ignore_index, mode, mask);
  TORCH_CHECK(p.is_planar_isotropic(), op, ": the CUDA kernels compute 2-D maps with one ",
              "radius, stride and pool_size on both axes, got logits ", logits.sizes(),
              ", radius ", radius, ", stride ", stride, ", pool_size ", pool_size,
              "; use backend 'torch' (or 'cpu' on CPU tensors) for volumes and per-axis options");
  TORCH_CHECK(p.mode != kRegionMode || at::isFloatingType(labels.scalar_type()), op,
              ": mode 'region' takes a float target");
  return p;
}

// The target as the kernels read it. Integer labels: uint8, int32 and int64 as they are, int8
// and int16 through an int32 copy ([N, H, W], 1/C of the logits' elements). A float target: as
// it is in the logits' dtype, else a copy in the compute type (reading it in the compute type
// is what the other backends do); in mode "region" always in the compute type (one
// RegionTarget instantiation per logits type).
Tensor kernel_target(const Tensor& labels, const Tensor& logits, c10::string_view mode) {
  const auto t = labels.scalar_type();
  if (t == at::kChar || t == at::kShort) return labels.to(at::kInt);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (!at::isFloatingType(t) || (t == logits.scalar_type() && mode != "region")) return labels;
  return labels.to(acc);
}

// Calls f(target) with the kernels' reader of the target (rmi_kernels.cuh, "targets"):
// LabelTarget<label_t> of integer labels, or FloatTarget<scalar_t or acc_t> of a float target
// (kernel_target; RegionTarget<acc_t> in mode "region") and its mask, made contiguous (1 byte
// per pixel) into `keep`, which holds it until the launches are queued; null without a mask.
template <typename scalar_t, typename acc_t, typename F>
void dispatch_target(const Problem& g, const Tensor& target, const c10::optional<Tensor>& mask,
                     Tensor& keep, F&& f) {
  const auto t = target.scalar_type();
  if (at::isFloatingType(t)) {
    if (mask.has_value()) keep = mask->contiguous();
    const bool* m = mask.has_value() ? keep.const_data_ptr<bool>() : nullptr;
    auto values = [&](auto value_tag) {
      using value_t = decltype(value_tag);
      return FloatTarget<value_t>{target.const_data_ptr<value_t>(), target.stride(1), m};
    };
    if (t == c10::CppTypeToScalarType<scalar_t>::value && g.mode != kRegionMode)
      return f(values(scalar_t{}));
    TORCH_CHECK(t == c10::CppTypeToScalarType<acc_t>::value,
                "rmi_ext: internal error: float target of dtype ", t);  // see kernel_target
    if (g.mode == kRegionMode) return f(RegionTarget<acc_t>{values(acc_t{})});
    return f(values(acc_t{}));
  }
  switch (t) {
    case at::kByte: return f(LabelTarget<uint8_t>{target.const_data_ptr<uint8_t>()});
    case at::kInt: return f(LabelTarget<int32_t>{target.const_data_ptr<int32_t>()});
    case at::kLong: return f(LabelTarget<int64_t>{target.const_data_ptr<int64_t>()});
    default: TORCH_CHECK(false, "rmi_ext: unsupported labels dtype ", t);
  }
}

// Whether the backward records the max-pooling arg-max (an int32 per pooled element).
bool records_argmax(const Problem& g) { return g.pool == kMaxPool && g.factor() > 1; }

ForwardStatsResult forward_stats_cuda(const Tensor& logits, const Tensor& labels_in,
                                      at::IntArrayRef radius, at::IntArrayRef stride,
                                      c10::string_view pool, at::IntArrayRef pool_size,
                                      int64_t ignore_index, c10::string_view mode,
                                      const c10::optional<Tensor>& mask) {
  const Tensor labels = kernel_target(labels_in, logits, mode);
  const Problem g = check_cuda_inputs("rmi_ext::forward_stats", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode, mask);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t planes = g.N * g.C, d = g.d;
  const Divisors dv = make_divisors(g);
  const LaunchPlan plan = plan_launches(g);
  const auto f64 = logits.options().dtype(at::kDouble);
  const auto i64 = logits.options().dtype(at::kLong);
  Tensor base_sum = at::empty({}, f64), base_count = at::empty({}, f64);
  Tensor nonfinite = at::empty({}, i64);
  Tensor means = at::empty({g.N, g.C, 2, d}, f64), cov = at::empty({g.N, g.C, 3, d, d}, f64);

  const unsigned int parts = plan.first_term_blocks;
  Tensor part_sums = at::empty({2, parts}, f64), part_nonfinite = at::empty({parts}, i64);
  Tensor offsets = at::empty({planes, 2}, f64);
  // Bounded by plan_moments (1/4 byte per logit); no pooled map is stored: the offsets and the
  // moment kernels compute the pooled Y and P from the logits and the target.
  Tensor partials = at::empty({planes, plan.moments.chunks, plan.moments.entries}, f64);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rmi_forward_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor keep;
    dispatch_target<scalar_t, acc_t>(g, labels, mask, keep, [&](auto target) {
      using Target = decltype(target);
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      // (a) first_term: per-block sums (first_term_final_kernel adds them up below).
      first_term_kernel<scalar_t, acc_t, Target><<<parts, kThreads, 0, stream>>>(
          x, target, g, dv, part_sums[0].mutable_data_ptr<double>(),
          part_sums[1].mutable_data_ptr<double>(), part_nonfinite.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // (b) moment_sums, on the pooled maps of (a) computed from the logits tile by tile.
      dispatch_pool_kind(pooled_kind(g), [&](auto kind) {
        constexpr int k = decltype(kind)::value;
        moment_sums_offsets_kernel<scalar_t, acc_t, Target, k>
            <<<plan.plane_blocks, kThreads, 0, stream>>>(x, target, g, dv,
                                                          offsets.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        moment_sums_partials_kernel<scalar_t, acc_t, Target, k>
            <<<plan.moment_grid, kThreads, 0, stream>>>(
                x, target, offsets.const_data_ptr<double>(), g, dv, plan.moments,
                partials.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  first_term_final_kernel<<<1, kThreads, 0, stream>>>(
      part_sums[0].const_data_ptr<double>(), part_sums[1].const_data_ptr<double>(),
      part_nonfinite.const_data_ptr<int64_t>(), parts, base_sum.mutable_data_ptr<double>(),
      base_count.mutable_data_ptr<double>(), nonfinite.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  moment_sums_finalize_kernel<<<plan.finalize_blocks, kThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), offsets.const_data_ptr<double>(), g, plan.moments,
      means.mutable_data_ptr<double>(), cov.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {base_sum, base_count, nonfinite, means, cov};
}

Tensor backward_grad_cuda(const Tensor& logits, const Tensor& labels_in, const Tensor& base_scale,
                          const Tensor& coef, const Tensor& shift, at::IntArrayRef radius,
                          at::IntArrayRef stride, c10::string_view pool,
                          at::IntArrayRef pool_size, int64_t ignore_index,
                          c10::string_view mode, const c10::optional<Tensor>& mask) {
  const Tensor labels = kernel_target(labels_in, logits, mode);
  const Problem g = check_cuda_inputs("rmi_ext::backward_grad", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode, mask);
  check_backward_inputs(g, logits, base_scale, coef, shift);
  if (records_argmax(g)) {
    // The arg-max is an int32 position in the window clipped to the map (max_window_arg).
    const int64_t rows = g.kernel() < g.H() ? g.kernel() : g.H(),
                  cols = g.kernel() < g.W() ? g.kernel() : g.W();
    TORCH_CHECK(rows * cols <= INT32_MAX, "rmi_ext::backward_grad: max pooling windows of ",
                rows, "x", cols, " pixels (pool_size ", g.kernel(), ", input ", g.H(), "x", g.W(),
                ") are not supported: a window must hold fewer than 2^31 pixels");
  }
  const c10::cuda::CUDAGuard device_guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Divisors dv = make_divisors(g);
  const LaunchPlan plan = plan_launches(g);
  // Small float64 tensors (N*C*d*d): made contiguous, unlike the logits and labels.
  const Tensor coef_c = coef.contiguous(), shift_c = shift.contiguous();
  // The logits' memory format (empty_like preserves a dense layout, e.g. channels_last); the
  // kernel writes through the result's strides whatever they are, visiting channels-last
  // outputs in N, H, W, C order so that neighbouring threads write neighbouring elements.
  Tensor grad = at::empty_like(logits);
  OutStrides os;
  for (int i = 0; i < 4; ++i) os.s[i] = grad.stride(i);
  os.channels_last = grad.stride(1) == 1 && g.C > 1 &&
                     grad.is_contiguous(at::MemoryFormat::ChannelsLast);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rmi_backward_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    // Factor 1: one fused pass over every plane, no scratch. Factor > 1: blocks of planes whose
    // pooled maps (y, p, grad_pooled, max-pooling arg-max) fit in 1/16 of the logits' bytes.
    const BackwardPlan bp = plan_backward(g, logits.element_size(), sizeof(acc_t),
                                          records_argmax(g));
    Tensor keep;
    dispatch_target<scalar_t, acc_t>(g, labels, mask, keep, [&](auto target) {
      using Target = decltype(target);
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      // Softmax mode: the channel log-sum-exp of the CE gradient ([N, H, W]), and for a float
      // target the per-pixel sum of Y over classes ([2, N, H, W]; first_term_lse_store).
      Tensor lse = g.mode == kSoftmaxMode
                       ? at::empty({Target::kFloat ? 2 : 1, g.N, g.H(), g.W()}, acc)
                       : at::Tensor();
      if (lse.defined()) {
        first_term_lse_kernel<scalar_t, acc_t, Target>
            <<<plan.pixel_blocks, kThreads, 0, stream>>>(x, target, g, dv,
                                                         lse.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const acc_t* lse_ptr = lse.defined() ? lse.const_data_ptr<acc_t>() : nullptr;
      const double* cf = coef_c.const_data_ptr<double>();
      const double* sh = shift_c.const_data_ptr<double>();
      if (g.factor() == 1) {  // (d) pooled_grad_stencil fused into (e) full_res_grad
        full_res_grad_kernel<scalar_t, acc_t, Target, true>
            <<<bp.full_blocks, kThreads, 0, stream>>>(
                x, target, g, dv, block_of(g, bp, 0), cf, sh, nullptr, nullptr, lse_ptr,
                base_scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>(), os);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      // Scratch of one block, reused by every block (kernels run in stream order).
      Tensor y = at::empty({bp.scratch_planes, g.h(), g.w()}, acc), p = at::empty_like(y);
      Tensor grad_pooled = at::empty_like(y);
      // Max pooling: where each window has its maximum, recorded by the pooled-maps pass, so
      // the full-resolution pass does not rescan the windows.
      Tensor argmax = records_argmax(g) ? at::empty({bp.scratch_planes, g.h(), g.w()},
                                                    logits.options().dtype(at::kInt))
                                        : Tensor();
      int32_t* arg = argmax.defined() ? argmax.mutable_data_ptr<int32_t>() : nullptr;
      for (int64_t k = 0; k < bp.blocks; ++k) {
        const PlaneBlock blk = block_of(g, bp, k);
        // (a) pooled_maps, (d) pooled_grad_stencil, (e) pool_adjoint + full_res_grad.
        dispatch_pool_kind(pooled_kind(g), [&](auto kind) {
          pooled_maps_kernel<scalar_t, acc_t, Target, decltype(kind)::value>
              <<<bp.pooled_blocks, kThreads, 0, stream>>>(x, target, g, dv, blk,
                                                          y.mutable_data_ptr<acc_t>(),
                                                          p.mutable_data_ptr<acc_t>(), arg);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        pooled_grad_stencil_kernel<acc_t><<<bp.pooled_blocks, kThreads, 0, stream>>>(
            y.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(), cf, sh, g, dv, blk,
            grad_pooled.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        full_res_grad_kernel<scalar_t, acc_t, Target, false>
            <<<bp.full_blocks, kThreads, 0, stream>>>(
                x, target, g, dv, blk, cf, sh, grad_pooled.const_data_ptr<acc_t>(), arg, lse_ptr,
                base_scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>(), os);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace rmi

TORCH_LIBRARY_IMPL(rmi_ext, CUDA, m) {
  rmi::register_kernels(m, &rmi::cuda::forward_stats_cuda, &rmi::cuda::backward_grad_cuda);
}
