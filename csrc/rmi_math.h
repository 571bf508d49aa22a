// Per-element math and pooling geometry of the RMI loss, shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) kernels. Torch-free on purpose: nvcc can compile-check it without torch headers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RMI_HD __host__ __device__ __forceinline__
#else
#define RMI_HD inline
#endif

namespace rmi {

constexpr double kPosAlpha = 5e-4;  // ridge of (Sp + aI) and (M + aI)
constexpr double kClipMin = 1e-6;   // added to P (sigmoid mode), clamp floor (softmax mode)
constexpr double kLogEps = 1e-8;    // log(L_ii + 1e-8)

enum PoolKind : int { kAvgPool = 0, kMaxPool = 1, kInterp = 2 };
// kRegionMode: region_mi (RMI_SPEC.md section 6), P = the map itself times the mask, no first
// term; the kernels read the map where the other modes read the sigmoid (rmi_cpu.cpp: prob_row,
// pooled_maps_plane, full_res_grad_row; rmi_kernels.cuh: a RegionTarget). rmi_prob /
// rmi_prob_slope below keep the two loss modes only: a third branch made a CUDA kernel spill
// registers on sm_80.
enum LossMode : int { kSigmoidMode = 0, kSoftmaxMode = 1, kRegionMode = 2 };

// A pixel counts when 0 <= label < C and label != ignore_index.
RMI_HD bool is_valid_label(int64_t label, int64_t num_classes, int64_t ignore_index) {
  return label >= 0 && label < num_classes && label != ignore_index;
}

// Sigmoid and BCE-with-logits from one exp: e = exp(-|x|).
template <typename T>
struct SigmoidBce {
  T sig;  // sigmoid(x)
  T e;    // exp(-|x|)
};

template <typename T>
RMI_HD SigmoidBce<T> sigmoid_parts(T x) {
  using std::exp;  // float overloads on the host; CUDA provides its own
  using std::fabs;
  T e = exp(-fabs(x));
  T inv = T(1) / (T(1) + e);
  return {x >= T(0) ? inv : e * inv, e};
}

// BCEWithLogits(x, y) for y in {0, 1}: max(x, 0) - x*y + log1p(exp(-|x|)).
template <typename T>
RMI_HD T bce_with_logits(T x, bool y, T e) {
  using std::log1p;
  return (x > T(0) ? x : T(0)) - (y ? x : T(0)) + log1p(e);
}

// The same for a float target y in [0, 1] (the CUDA kernels' float targets).
template <typename T>
RMI_HD T bce_with_logits(T x, T y, T e) {
  using std::log1p;
  return (x > T(0) ? x : T(0)) - x * y + log1p(e);
}

// The RMI probability P and its slope dP/dx for one pixel of one class.
// Sigmoid mode: P = sig*m + 1e-6. Softmax mode: P = clamp(sig*m, 1e-6, 1), slope 0 outside.
template <typename T>
RMI_HD T rmi_prob(T sig, bool valid, int mode) {
  T pm = valid ? sig : T(0);
  if (mode == kSigmoidMode) return pm + T(kClipMin);
  return pm < T(kClipMin) ? T(kClipMin) : (pm > T(1) ? T(1) : pm);
}

template <typename T>
RMI_HD T rmi_prob_slope(T sig, bool valid, int mode) {
  if (!valid) return T(0);
  T slope = sig * (T(1) - sig);
  if (mode == kSoftmaxMode && !(sig >= T(kClipMin) && sig <= T(1))) return T(0);
  return slope;
}

// Length of a downsampled axis (interp: n / s; pools: floor mode, padding kernel / 2). An axis
// of factor 1 is downsampled too when another axis is (a kernel > 1 then smooths it).
RMI_HD int64_t pooled_len(int64_t n, int pool, int64_t kernel, int64_t stride) {
  if (pool == kInterp) return n / stride;
  return (n + 2 * (kernel / 2) - kernel) / stride + 1;
}

// Pool window of output index o along an axis of length n: input indices [*begin, *end).
RMI_HD void pool_window(int64_t o, int64_t n, int64_t kernel, int64_t stride, int64_t* begin,
                        int64_t* end) {
  int64_t start = o * stride - kernel / 2;
  int64_t stop = start + kernel;
  *begin = start < 0 ? 0 : start;
  *end = stop > n ? n : stop;
}

// Scale of F.interpolate(mode="nearest"): n_in / n_out in float, as PyTorch computes it.
RMI_HD float nearest_scale(int64_t n_in, int64_t n_out) {
  return static_cast<float>(n_in) / static_cast<float>(n_out);
}

// Nearest source index of F.interpolate(mode="nearest"), with scale = nearest_scale(n_in,
// n_out) computed once per axis (the GPU kernels pass it; no division per element).
RMI_HD int64_t nearest_source(int64_t o, int64_t n_in, int64_t n_out, float scale) {
  if (n_out == n_in) return o;
  if (n_out == 2 * n_in) return o >> 1;
  int64_t src = static_cast<int64_t>(floorf(static_cast<float>(o) * scale));
  return src < n_in - 1 ? src : n_in - 1;
}

// The same, computing the scale (float scale, as PyTorch computes it).
RMI_HD int64_t nearest_source(int64_t o, int64_t n_in, int64_t n_out) {
  if (n_out == n_in) return o;
  return nearest_source(o, n_in, n_out, nearest_scale(n_in, n_out));
}

// Bilinear (align_corners=True) source indices and weights of output index o, in type T.
template <typename T>
struct LinearTap {
  int64_t i0, i1;
  T w0, w1;
};

// Scale of the bilinear align_corners=True taps: (n_in - 1) / (n_out - 1) in type T.
template <typename T>
RMI_HD T linear_scale(int64_t n_in, int64_t n_out) {
  return n_out > 1 ? static_cast<T>(n_in - 1) / static_cast<T>(n_out - 1) : T(0);
}

// Taps of output index o with scale = linear_scale<T>(n_in, n_out) computed once per axis (the
// GPU kernels pass it; no division per element). Call it with a T scale and int64_t sizes.
template <typename T>
RMI_HD LinearTap<T> linear_tap(int64_t o, int64_t n_in, T scale) {
  T src = scale * static_cast<T>(o);
  int64_t i0 = static_cast<int64_t>(src);
  T w1 = src - static_cast<T>(i0);
  w1 = w1 < T(0) ? T(0) : (w1 > T(1) ? T(1) : w1);
  return {i0, i0 + (i0 < n_in - 1 ? 1 : 0), T(1) - w1, w1};
}

// The same, computing the scale.
template <typename T>
RMI_HD LinearTap<T> linear_tap(int64_t o, int64_t n_in, int64_t n_out) {
  return linear_tap<T>(o, n_in, linear_scale<T>(n_in, n_out));
}

}  // namespace rmi
