// The C++ side of the rmi_ext ops, written once for every device: the kernels' C++ signatures,
// the parsing of the string options and the input checks. csrc/cpu/rmi_cpu.cpp and
// csrc/cuda/rmi_cuda.cu include it and register through register_kernels(), so a kernel whose
// signature differs from the schema's (csrc/rmi.cpp) does not compile. The user-facing
// messages for bad arguments come from rmi_ext/_config.py before an op is called; these checks
// guard direct calls of the ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <tuple>

#include "rmi_problem.h"

namespace rmi {

using at::Tensor;

// forward_stats -> (base_sum f64[], base_count f64[], nonfinite i64[], means f64[N, C, 2, d],
//                   cov f64[N, C, 3, d, d])
using ForwardStatsResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using ForwardStatsFn = ForwardStatsResult(const Tensor& logits, const Tensor& labels,
                                          int64_t radius, int64_t stride, c10::string_view pool,
                                          int64_t pool_size, int64_t ignore_index,
                                          c10::string_view mode);
// backward_grad -> grad_logits in the logits' dtype and memory format.
using BackwardGradFn = Tensor(const Tensor& logits, const Tensor& labels,
                              const Tensor& base_scale, const Tensor& coef, const Tensor& shift,
                              int64_t radius, int64_t stride, c10::string_view pool,
                              int64_t pool_size, int64_t ignore_index, c10::string_view mode);

// The kernels of one dispatch key (TORCH_LIBRARY_IMPL(rmi_ext, KEY, m)).
inline void register_kernels(torch::Library& m, ForwardStatsFn* forward_stats,
                             BackwardGradFn* backward_grad) {
  m.impl("forward_stats", forward_stats);
  m.impl("backward_grad", backward_grad);
}

inline int parse_pool(c10::string_view pool) {
  if (pool == "avg") return kAvgPool;
  if (pool == "max") return kMaxPool;
  TORCH_CHECK(pool == "interp", "rmi_ext: pool must be 'avg', 'max' or 'interp', got '", pool,
              "'");
  return kInterp;
}

inline int parse_mode(c10::string_view mode) {
  if (mode == "sigmoid") return kSigmoidMode;
  TORCH_CHECK(mode == "softmax", "rmi_ext: mode must be 'sigmoid' or 'softmax', got '", mode,
              "'");
  return kSoftmaxMode;
}

// Label dtypes, the same on every backend (rmi_ext/_config.py LABEL_DTYPES).
inline bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// Checks the inputs of either op (`op` names it in messages) and describes the problem.
inline Problem check_inputs(const char* op, const Tensor& logits, const Tensor& labels,
                            int64_t radius, int64_t stride, c10::string_view pool,
                            int64_t pool_size, int64_t ignore_index, c10::string_view mode) {
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels must be on the logits' device ",
              logits.device(), ", got ", labels.device());
  TORCH_CHECK(logits.dim() == 4, op, ": logits must be 4-D [N, C, H, W], got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": logits must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(is_label_dtype(labels.scalar_type()), op,
              ": labels must be uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  const int64_t n = logits.size(0), c = logits.size(1), h = logits.size(2), w = logits.size(3);
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == n && labels.size(1) == h &&
                  labels.size(2) == w,
              op, ": labels must have shape [N, H, W] = [", n, ", ", h, ", ", w,
              "] to match logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(n >= 1 && c >= 1 && h >= 1 && w >= 1, op, ": logits must not be empty, got shape ",
              logits.sizes());
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(logits.stride(i) >= 0, op, ": logits must have non-negative strides, got ",
                logits.strides());
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(labels.stride(i) >= 0, op, ": labels must have non-negative strides, got ",
                labels.strides());
  TORCH_CHECK(radius >= 1 && radius <= kMaxRadius, op, ": radius must be in [1, ", kMaxRadius,
              "], got ", radius);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(pool_size >= 1, op, ": pool_size must be >= 1, got ", pool_size);
  const int64_t sizes[4] = {n, c, h, w};
  const int64_t x_strides[4] = {logits.stride(0), logits.stride(1), logits.stride(2),
                                logits.stride(3)};
  const int64_t l_strides[3] = {labels.stride(0), labels.stride(1), labels.stride(2)};
  const Problem p = make_planar_problem(sizes, x_strides, l_strides, radius, stride,
                                        parse_pool(pool), pool_size, ignore_index,
                                        parse_mode(mode));
  TORCH_CHECK(p.h() >= radius && p.w() >= radius, op, ": the downsampled map is ", p.h(), "x",
              p.w(),
              " (input ", h, "x", w, ", stride ", stride, ", pool '", pool, "'), smaller than",
              " the region radius ", radius, ": no region fits; use a smaller stride or radius");
  TORCH_CHECK(p.d <= kMaxRegionLength, op, ": the region holds ", p.d, " pixels, more than ",
              kMaxRegionLength);
  return p;
}

// Checks the float64 inputs of backward_grad: base_scale [], coef [N, C, 2, d, d], shift [N, C, d].
inline void check_backward_inputs(const Problem& p, const Tensor& logits,
                                  const Tensor& base_scale, const Tensor& coef,
                                  const Tensor& shift) {
  const std::pair<const char*, const Tensor*> named[3] = {
      {"base_scale", &base_scale}, {"coef", &coef}, {"shift", &shift}};
  const std::vector<int64_t> shapes[3] = {{}, {p.N, p.C, 2, p.d, p.d}, {p.N, p.C, p.d}};
  for (int i = 0; i < 3; ++i) {
    const Tensor& t = *named[i].second;
    TORCH_CHECK(t.scalar_type() == at::kDouble, "rmi_ext::backward_grad: ", named[i].first,
                " must be float64, got ", t.scalar_type());
    TORCH_CHECK(t.device() == logits.device(), "rmi_ext::backward_grad: ", named[i].first,
                " must be on the logits' device ", logits.device(), ", got ", t.device());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[i]), "rmi_ext::backward_grad: ",
                named[i].first, " must have shape ", at::IntArrayRef(shapes[i]), ", got ",
                t.sizes());
  }
}

}  // namespace rmi
