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

#include <string>
#include <tuple>

#include "rmi_problem.h"

namespace rmi {

using at::Tensor;

// forward_stats -> (base_sum f64[], base_count f64[], nonfinite i64[], means f64[N, C, 2, d],
//                   cov f64[N, C, 3, d, d]). radius, stride, pool_size: one side per spatial axis.
using ForwardStatsResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using ForwardStatsFn = ForwardStatsResult(const Tensor& logits, const Tensor& labels,
                                          at::IntArrayRef radius, at::IntArrayRef stride,
                                          c10::string_view pool, at::IntArrayRef pool_size,
                                          int64_t ignore_index, c10::string_view mode,
                                          const c10::optional<Tensor>& mask);
// backward_grad -> grad_logits in the logits' dtype and memory format.
using BackwardGradFn = Tensor(const Tensor& logits, const Tensor& labels,
                              const Tensor& base_scale, const Tensor& coef, const Tensor& shift,
                              at::IntArrayRef radius, at::IntArrayRef stride,
                              c10::string_view pool, at::IntArrayRef pool_size,
                              int64_t ignore_index, c10::string_view mode,
                              const c10::optional<Tensor>& mask);

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
  if (mode == "region") return kRegionMode;  // region_mi: P = the map times the mask
  TORCH_CHECK(mode == "softmax", "rmi_ext: mode must be 'sigmoid', 'softmax' or 'region', got '",
              mode, "'");
  return kSoftmaxMode;
}

// Label dtypes, the same on every backend (rmi_ext/_config.py LABEL_DTYPES).
inline bool is_label_dtype(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// "4x5" for the sizes {4, 5}.
inline std::string join_sizes(const int64_t* sizes, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += (i ? "x" : "") + std::to_string(sizes[i]);
  return out;
}

// Checks the inputs of either op (`op` names it in messages) and describes the problem:
// logits [N, C, H, W] or [N, C, D, H, W], labels [N, H, W] or [N, D, H, W] (or a float target of
// the logits' shape with an optional bool mask [N, H, W] / [N, D, H, W]), and radius, stride,
// pool_size with one side per spatial axis.
inline Problem check_inputs(const char* op, const Tensor& logits, const Tensor& labels,
                            at::IntArrayRef radius, at::IntArrayRef stride, c10::string_view pool,
                            at::IntArrayRef pool_size, int64_t ignore_index,
                            c10::string_view mode, const c10::optional<Tensor>& mask) {
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels must be on the logits' device ",
              logits.device(), ", got ", labels.device());
  const int rank = static_cast<int>(logits.dim()) - 2;
  const bool float_target = at::isFloatingType(labels.scalar_type());
  TORCH_CHECK(!float_target || labels.sizes() == logits.sizes(), op,
              ": a float target must have the logits' shape ", logits.sizes(), ", got ",
              labels.sizes());
  if (mask.has_value()) {
    const Tensor& m = *mask;
    bool mask_match = float_target && m.scalar_type() == at::kBool && m.dim() == rank + 1 &&
                      m.device() == logits.device() && m.size(0) == logits.size(0);
    for (int i = 0; mask_match && i < rank; ++i) mask_match = m.size(1 + i) == logits.size(2 + i);
    TORCH_CHECK(mask_match, op, ": mask must be a bool [N, *spatial] tensor on the logits' "
                "device beside a float target, got ", m.scalar_type(), " ", m.sizes());
  }
  TORCH_CHECK(rank == 2 || rank == kMaxSpatialAxes, op,
              ": logits must be 4-D [N, C, H, W] or 5-D [N, C, D, H, W], got shape ",
              logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": logits must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(float_target || is_label_dtype(labels.scalar_type()), op,
              ": labels must be uint8, int8, int16, int32 or int64, or a float target, got ",
              labels.scalar_type());
  // A float target is checked against the logits above; its spatial sizes and strides are those
  // of its axes past the class axis.
  const Tensor label_map = float_target ? labels.select(1, 0) : labels;
  bool labels_match = label_map.dim() == rank + 1 && label_map.size(0) == logits.size(0);
  for (int i = 0; labels_match && i < rank; ++i)
    labels_match = label_map.size(1 + i) == logits.size(2 + i);
  TORCH_CHECK(labels_match, op, ": labels must have shape [N, ", rank == 2 ? "H, W" : "D, H, W",
              "] to match logits ", logits.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(logits.numel() > 0, op, ": logits must not be empty, got shape ", logits.sizes());
  for (int64_t s : logits.strides())
    TORCH_CHECK(s >= 0, op, ": logits must have non-negative strides, got ", logits.strides());
  for (int64_t s : labels.strides())
    TORCH_CHECK(s >= 0, op, ": labels must have non-negative strides, got ", labels.strides());
  TORCH_CHECK(static_cast<int>(radius.size()) == rank &&
                  static_cast<int>(stride.size()) == rank &&
                  static_cast<int>(pool_size.size()) == rank,
              op, ": radius, stride and pool_size must have one side per spatial axis (", rank,
              "), got ", radius, ", ", stride, " and ", pool_size);
  for (int i = 0; i < rank; ++i) {
    TORCH_CHECK(radius[i] >= 1 && radius[i] <= kMaxRadius, op, ": radius must be in [1, ",
                kMaxRadius, "] on every axis, got ", radius);
    TORCH_CHECK(stride[i] >= 1, op, ": stride must be >= 1 on every axis, got ", stride);
    TORCH_CHECK(pool_size[i] >= 1, op, ": pool_size must be >= 1 on every axis, got ",
                pool_size);
  }
  int64_t sizes[2 + kMaxSpatialAxes], x_strides[2 + kMaxSpatialAxes];
  int64_t l_strides[1 + kMaxSpatialAxes];
  for (int i = 0; i < 2 + rank; ++i) sizes[i] = logits.size(i), x_strides[i] = logits.stride(i);
  for (int i = 0; i < 1 + rank; ++i) l_strides[i] = label_map.stride(i);
  const Problem p = make_problem(rank, sizes, x_strides, l_strides, radius.data(), stride.data(),
                                 pool_size.data(), parse_pool(pool), ignore_index,
                                 parse_mode(mode));
  int64_t pooled[kMaxSpatialAxes];
  bool fits = true;
  for (int i = 0; i < rank; ++i) {
    pooled[i] = p.axis[i].pooled;
    fits = fits && pooled[i] >= radius[i];
  }
  TORCH_CHECK(fits, op, ": the downsampled map is ", join_sizes(pooled, rank), " (input ",
              join_sizes(sizes + 2, rank), ", stride ", stride, ", pool '", pool,
              "'), smaller than the region radius ", radius,
              ": no region fits; use a smaller stride or radius");
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
