// CUDA implementations of the rmi_ext ops (schemas and output contracts: csrc/rmi.cpp; plain
// torch semantics: rmi_ext/torch_backend.py). Torch glue only: argument checks, allocation,
// dtype dispatch and launches on the current stream; the kernels are in rmi_kernels.cuh.
// Inputs are read through their strides (no copies); the float64 tiny-matrix stage (c) stays
// in Python (rmi_ext/linalg.py).
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

// Checks shared by both ops (rmi_ops.h) plus the device; returns the problem.
Problem check_cuda_inputs(const char* op, const Tensor& logits, const Tensor& labels,
                          int64_t radius, int64_t stride, c10::string_view pool,
                          int64_t pool_size, int64_t ignore_index, c10::string_view mode) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  const Problem p = check_inputs(op, logits, labels, radius, stride, pool, pool_size,
                                 ignore_index, mode);
  TORCH_CHECK(p.N * p.C <= INT32_MAX, op, ": N * C must be below 2^31, got ", p.N * p.C);
  return p;
}

// The kernels are built for uint8, int32 and int64 labels; int8 and int16 labels are read
// through an int32 copy ([N, H, W], 1/C of the logits' elements).
Tensor kernel_labels(const Tensor& labels) {
  const auto t = labels.scalar_type();
  return t == at::kChar || t == at::kShort ? labels.to(at::kInt) : labels;
}

// Calls f(label_t{}) with the C++ type of the labels.
template <typename F>
void dispatch_labels(const Tensor& labels, F&& f) {
  switch (labels.scalar_type()) {
    case at::kByte: return f(uint8_t{});
    case at::kInt: return f(int32_t{});
    case at::kLong: return f(int64_t{});
    default: TORCH_CHECK(false, "rmi_ext: unsupported labels dtype ", labels.scalar_type());
  }
}

// Stage (a), pooled maps Y and P [N, C, h, w] in the compute type acc_t.
template <typename scalar_t, typename acc_t, typename label_t>
void launch_pooled_maps(const Tensor& logits, const Tensor& labels, const Problem& g,
                        const Tensor& y, const Tensor& p, cudaStream_t stream) {
  pooled_maps_kernel<scalar_t, acc_t, label_t>
      <<<grid_blocks(g.N * g.C * g.h * g.w), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(), g,
          y.mutable_data_ptr<acc_t>(), p.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

ForwardStatsResult forward_stats_cuda(const Tensor& logits, const Tensor& labels_in,
                                      int64_t radius, int64_t stride, c10::string_view pool,
                                      int64_t pool_size, int64_t ignore_index,
                                      c10::string_view mode) {
  const Tensor labels = kernel_labels(labels_in);
  const Problem g = check_cuda_inputs("rmi_ext::forward_stats", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t planes = g.N * g.C, d = radius * radius;
  const auto f64 = logits.options().dtype(at::kDouble);
  const auto i64 = logits.options().dtype(at::kLong);
  Tensor base_sum = at::empty({}, f64), base_count = at::empty({}, f64);
  Tensor nonfinite = at::empty({}, i64);
  Tensor means = at::empty({g.N, g.C, 2, d}, f64), cov = at::empty({g.N, g.C, 3, d, d}, f64);

  const unsigned int parts = reduce_blocks(g.N * g.H * g.W);
  Tensor part_sums = at::empty({2, parts}, f64), part_nonfinite = at::empty({parts}, i64);
  const MomentPlan plan = plan_moments(planes, g.h - radius + 1, d);
  Tensor offsets = at::empty({planes, 2}, f64);
  Tensor partials = at::empty({planes, plan.chunks, plan.entries}, f64);
  const dim3 moment_grid(static_cast<unsigned int>(planes), static_cast<unsigned int>(plan.chunks),
                         static_cast<unsigned int>(ceil_div(plan.entries, kThreads)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rmi_forward_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Tensor y = at::empty({planes, g.h, g.w}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    Tensor p = at::empty_like(y);
    dispatch_labels(labels, [&](auto label_tag) {
      using label_t = decltype(label_tag);
      base_stats_kernel<scalar_t, acc_t, label_t><<<parts, kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(), g,
          part_sums[0].mutable_data_ptr<double>(), part_sums[1].mutable_data_ptr<double>(),
          part_nonfinite.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_pooled_maps<scalar_t, acc_t, label_t>(logits, labels, g, y, p, stream);
    });
    base_stats_final_kernel<<<1, kThreads, 0, stream>>>(
        part_sums[0].const_data_ptr<double>(), part_sums[1].const_data_ptr<double>(),
        part_nonfinite.const_data_ptr<int64_t>(), parts, base_sum.mutable_data_ptr<double>(),
        base_count.mutable_data_ptr<double>(), nonfinite.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    plane_offsets_kernel<acc_t><<<static_cast<unsigned int>(planes), kThreads, 0, stream>>>(
        y.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(), g.h * g.w,
        offsets.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    moment_partials_kernel<acc_t><<<moment_grid, kThreads, 0, stream>>>(
        y.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(), offsets.const_data_ptr<double>(),
        g, plan, partials.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  moment_finalize_kernel<<<grid_blocks(planes * d * d), kThreads, 0, stream>>>(
      partials.const_data_ptr<double>(), offsets.const_data_ptr<double>(), g, plan,
      means.mutable_data_ptr<double>(), cov.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {base_sum, base_count, nonfinite, means, cov};
}

Tensor backward_grad_cuda(const Tensor& logits, const Tensor& labels_in, const Tensor& base_scale,
                          const Tensor& coef, const Tensor& shift, int64_t radius, int64_t stride,
                          c10::string_view pool, int64_t pool_size, int64_t ignore_index,
                          c10::string_view mode) {
  const Tensor labels = kernel_labels(labels_in);
  const Problem g = check_cuda_inputs("rmi_ext::backward_grad", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode);
  check_backward_inputs(g, logits, base_scale, coef, shift);
  const int64_t planes = g.N * g.C;
  const c10::cuda::CUDAGuard device_guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
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
    Tensor y = at::empty({planes, g.h, g.w}, acc), p = at::empty_like(y);
    Tensor grad_pooled = at::empty_like(y);
    // Channel logsumexp for the CE gradient (softmax mode only).
    Tensor lse = g.mode == kSoftmaxMode ? at::empty({g.N, g.H, g.W}, acc) : at::Tensor();
    if (lse.defined()) {
      logsumexp_kernel<scalar_t, acc_t><<<grid_blocks(g.N * g.H * g.W), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), g, lse.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dispatch_labels(labels, [&](auto label_tag) {
      using label_t = decltype(label_tag);
      launch_pooled_maps<scalar_t, acc_t, label_t>(logits, labels, g, y, p, stream);
      pooled_grad_kernel<acc_t><<<grid_blocks(planes * g.h * g.w), kThreads, 0, stream>>>(
          y.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(), coef_c.const_data_ptr<double>(),
          shift_c.const_data_ptr<double>(), g, grad_pooled.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      full_grad_kernel<scalar_t, acc_t, label_t>
          <<<grid_blocks(planes * g.H * g.W), kThreads, 0, stream>>>(
              logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(), g,
              grad_pooled.const_data_ptr<acc_t>(),
              lse.defined() ? lse.const_data_ptr<acc_t>() : nullptr,
              base_scale.const_data_ptr<double>(), grad.mutable_data_ptr<scalar_t>(), os);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
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
