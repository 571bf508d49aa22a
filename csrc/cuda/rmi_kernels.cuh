// CUDA kernels of the RMI loss stages (a), (b), (d), (e) as templates (stage (c), the float64
// tiny-matrix stage, stays in Python torch: rmi_ext/linalg.py). Kernels are named after the
// stages of rmi_ext/torch_backend.py, whose plain-torch code is the semantics they reproduce,
// in the order of rmi_ext/function.py's autograd.Function (see docs/stages.md):
//   (a) first_term: first_term_kernel + first_term_final_kernel (the BCE / CE sums, a two-level
//       reduction); first_term_lse_kernel (softmax: the channel log-sum-exp, for the backward)
//   (a) pooled_maps: pooled_py (per pooled pixel, used by every kernel below that reads the
//       pooled maps); pooled_maps_kernel stores them for the backward at factor > 1
//   (b) moment_sums: moment_sums_offsets_kernel -> moment_sums_partials_kernel ->
//       moment_sums_finalize_kernel (plane offsets, tiled partial sums, means and covariances)
//   (d) pooled_grad_stencil: pooled_grad_stencil_kernel (factor > 1)
//   (e) pool_adjoint + full_res_grad: full_res_grad_kernel (pool_adjoint_at per pixel; at
//       factor 1 the stencil of (d) is fused into it)
// Each kernel's per-element function is named after it: first_term_at, pooled_maps_store,
// moment_sums_finalize_at, pooled_grad_stencil_store, full_res_grad_store.
//
// Torch-free on purpose (only rmi_math.h, <cstdint> and the CUDA runtime): nvcc compile-checks
// it without torch (csrc/cuda/check/compile_check.cu). The torch glue that checks arguments,
// allocates and launches is csrc/cuda/rmi_cuda.cu.
//
// Every kernel is a grid-stride loop (or a block reduction) around a __host__ __device__
// per-element function, the `*_at` and `*_store` functions below. csrc/cuda/check/emulate.cu
// runs those same functions on the host, in the kernels' plans (moment tiles, blocks of
// planes), so the math and the indexing are tested without a GPU (tests/test_cuda.py); only
// the loops, the block reductions, the shared-memory staging's synchronisation and the
// launches are GPU-only.
//
// Types: scalar_t is the logits' type (float, double, or a 16-bit float: __half/__nv_bfloat16
// here, at::Half/at::BFloat16 from the glue), acc_t the compute type (double for double
// logits, float otherwise, as torch_backend.compute_dtype), Target the target's reader (see
// "targets" below): LabelTarget<uint8_t/int32_t/int64_t>, FloatTarget<scalar_t or acc_t> or
// RegionTarget<acc_t>.
// Sums over many elements (first term, moments) are float64. Indices are int64_t throughout
// (tensors past 2^31 elements are fine); flat indices are decoded with FastDivmod, not with
// 64-bit divisions. Every grid dimension comes from plan_launches() / plan_backward(), which
// keep them within the CUDA limits at any size (kernels loop where a size could exceed them).
//
// Memory, in bytes per logit (b = the logits' element size), besides the O(N C d^2) float64
// matrices, the int32 copy of int8/int16 labels (4/C) and, in softmax mode, the backward's
// logsumexp map (4/C, or 8/C for float64; twice that with a float target, see
// first_term_lse_store):
//   forward, every factor: no pooled map is stored (the moment kernel computes the pooled Y and
//     P of each tile from the logits into shared memory); the moment partials take at most
//     1/4 byte, or one N C x entries float64 array when that is more (plan_moments);
//   backward, factor 1: only the gradient (b); the fused full_res_grad pass recomputes P and
//     Y of the stencil's neighbours from the logits;
//   backward, factor s > 1: the gradient (b) plus the pooled maps y, p, grad_pooled (and the
//     max-pooling arg-max) of one block of planes at a time: at most b / 16 (plan_backward),
//     unless a single plane needs more (h w (3 sizeof(acc_t) + 4) bytes, about 12/s^2 or
//     16/s^2 per logit of the plane).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "rmi_math.h"
#include "rmi_problem.h"

namespace rmi {
namespace cuda {

constexpr int kThreads = 256;               // every launch uses blocks of kThreads threads
// Resident blocks per SM that ptxas must allow (__launch_bounds__ minBlocksPerMultiprocessor)
// for the heaviest kernels: without the hint ptxas's own occupancy target spilled them
// (moment_sums_partials_kernel needs about 110 registers, 2 blocks allow 128; the fused
// full_res_grad_kernel and the max-pooling moment_sums_offsets_kernel about 70-80, 3 blocks
// allow 85). tests/test_cuda.py asserts no spills.
constexpr int kMomentMinBlocks = 2;
constexpr int kPixelMinBlocks = 3;
constexpr int64_t kMaxReduceBlocks = 1024;  // blocks of the first-term reduction (fixed, so the
                                            // summation order and the result are deterministic)
constexpr int64_t kMaxGridBlocks = int64_t(1) << 30;  // cap of a grid-stride grid (gridDim.x)
constexpr int64_t kMaxGridYZ = 65535;                 // CUDA's limit of gridDim.y and gridDim.z

RMI_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a grid-stride launch over n elements.
inline unsigned int grid_blocks(int64_t n) {
  int64_t blocks = ceil_div(n, kThreads);
  blocks = blocks < 1 ? 1 : (blocks > kMaxGridBlocks ? kMaxGridBlocks : blocks);
  return static_cast<unsigned int>(blocks);
}

// Blocks of the first-term reduction over n pixels.
inline unsigned int reduce_blocks(int64_t n) {
  int64_t blocks = ceil_div(n, kThreads);
  blocks = blocks < 1 ? 1 : (blocks > kMaxReduceBlocks ? kMaxReduceBlocks : blocks);
  return static_cast<unsigned int>(blocks);
}

// ---- index arithmetic ------------------------------------------------------------------------
//
// The kernels decode flat element indices into (n, c, y, x) by sizes fixed at launch. The GPU
// has no 64-bit integer divide: `/` and `%` on int64 are a subroutine of several dozen
// instructions, three to five of them per element in the element-wise kernels. FastDivmod
// divides by a multiply-high, an add and a shift instead: Granlund and Montgomery's round-up
// method ("Division by invariant integers using multiplication", PLDI 1994, theorem 4.2 with
// N = 64; PyTorch's IntDivider does the same in 32 bits), with shift = ceil(log2 d) and
// magic = floor(2^64 (2^shift - d) / d) + 1: n / d = (mulhi(n, magic) + n) >> shift, exact for
// every d in [1, 2^63) and n in [0, 2^63) (mulhi(n, magic) <= n, so the sum does not wrap).
// check/emulate.cu --selftest tests it on edge values and at random against plain division.

// High 64 bits of the 128-bit product a * b, from 32-bit halves (no overflow: the middle sum
// is at most (2^32 - 1)^2 + 2 (2^32 - 1) < 2^64).
RMI_HD uint64_t mulhi_u64_parts(uint64_t a, uint64_t b) {
  const uint64_t a_lo = a & 0xffffffffu, a_hi = a >> 32;
  const uint64_t b_lo = b & 0xffffffffu, b_hi = b >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo;
  const uint64_t lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const uint64_t middle = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (middle >> 32);
}

RMI_HD uint64_t mulhi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#elif defined(__SIZEOF_INT128__)
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else
  return mulhi_u64_parts(a, b);
#endif
}

struct FastDivmod {
  int64_t divisor;  // d >= 1
  uint64_t magic;
  int shift;

  // n / d for 0 <= n < 2^63.
  RMI_HD int64_t div(int64_t n) const {
    const uint64_t u = static_cast<uint64_t>(n);
    return static_cast<int64_t>((mulhi_u64(u, magic) + u) >> shift);
  }
  // n / d, and n % d into *rem.
  RMI_HD int64_t divmod(int64_t n, int64_t* rem) const {
    const int64_t q = div(n);
    *rem = n - q * divisor;
    return q;
  }
};

// Host side: the magic number of divisor d (1 <= d < 2^63) by long division, so no 128-bit
// type is needed.
inline FastDivmod make_fast_divmod(int64_t divisor) {
  const uint64_t d = static_cast<uint64_t>(divisor);
  int shift = 0;
  while (shift < 63 && (uint64_t(1) << shift) < d) ++shift;
  uint64_t rem = (uint64_t(1) << shift) - d, quot = 0;  // rem < d < 2^63: rem << 1 fits
  for (int bit = 0; bit < 64; ++bit) {                  // quot = floor(rem 2^64 / d)
    rem <<= 1;
    quot <<= 1;
    if (rem >= d) {
      rem -= d;
      quot |= 1;
    }
  }
  return {divisor, quot + 1, shift};
}

// Per-axis scales of the interp pooling (nearest_scale, linear_scale in float and double),
// computed once per call on the host (IEEE division, as the per-element division gave).
struct AxisScales {
  float nearest;
  float linear_f;
  double linear_d;
  template <typename T>
  RMI_HD T linear() const {
    return std::is_same<T, double>::value ? static_cast<T>(linear_d) : static_cast<T>(linear_f);
  }
};

inline AxisScales make_axis_scales(int64_t n_in, int64_t n_out) {
  return {nearest_scale(n_in, n_out), linear_scale<float>(n_in, n_out),
          linear_scale<double>(n_in, n_out)};
}

// The divisors of the kernels' index decoding and the interp scales, built once per call
// (make_divisors).
struct Divisors {
  FastDivmod W, H, C;  // full-resolution width, height, channels
  FastDivmod w, h;     // pooled width and height
  FastDivmod factor;   // the downsampling factor (pool stride)
  AxisScales sh, sw;   // interp scales of the rows (H -> h) and the columns (W -> w)
};

inline Divisors make_divisors(const Problem& g) {
  return {make_fast_divmod(g.W()),      make_fast_divmod(g.H()),
          make_fast_divmod(g.C),      make_fast_divmod(g.w()),
          make_fast_divmod(g.h()),      make_fast_divmod(g.factor()),
          make_axis_scales(g.H(), g.h()), make_axis_scales(g.W(), g.w())};
}

// A block of (n, c) planes that a backward launch covers: images [n0, n0 + images) x channels
// [c0, c0 + channels), with channels == C (whole images) or images == 1 (a channel range of one
// image). Elements of the block are indexed locally, [images, channels, ...] (or [images, H, W,
// channels] for a channels-last output); scratch maps hold the block's planes only.
struct PlaneBlock {
  int64_t n0, c0;
  int64_t images, channels;
  FastDivmod channel_div;  // divisor `channels`
};

inline PlaneBlock make_plane_block(int64_t n0, int64_t c0, int64_t images, int64_t channels) {
  return {n0, c0, images, channels, make_fast_divmod(channels)};
}

// Image and channel of local plane lp of a block.
RMI_HD void block_plane(const PlaneBlock& b, int64_t lp, int64_t* n, int64_t* c) {
  int64_t dc;
  *n = b.n0 + b.channel_div.divmod(lp, &dc);
  *c = b.c0 + dc;
}

// Strides of the gradient output (the logits' memory format, see rmi_cuda.cu).
struct OutStrides {
  int64_t s[4];
  bool channels_last;  // visit elements in N, H, W, C order (coalesced writes for NHWC)
};

// ---- targets ---------------------------------------------------------------------------------
//
// Every kernel that reads the target takes it as a template parameter `Target` (RMI_SPEC.md
// section 6), one of:
//   LabelTarget<label_t>: integer labels [N, H, W] (strides g.ls); a pixel counts when its
//     label is a class and not ignore_index; Y of class c is 1 where the label is c.
//   FloatTarget<value_t>: a float target [N, C, H, W] (N, H, W strides g.ls, class stride
//     c_stride) and a contiguous bool mask [N, H, W], or none (null: every pixel counts; a
//     strided mask cost sm_90 kernels registers and spills); a pixel counts where the mask is
//     true; Y = the target times the mask.
//   RegionTarget<acc_t>: a FloatTarget (in the compute type) for mode "region" (region_mi): P
//     is the map itself (the "logits") times the mask, its slope the mask, and there is no
//     first term. A type of its own (Target::kRegion) so that the branch is compiled out of the
//     loss kernels: as a runtime test it cost the max-pooling moment kernel registers and
//     spills.
// They are read through target_plane (the view of plane (n, c)), target_row (one row of it)
// and target_at (one pixel: TargetPixel).

template <typename acc_t>
struct TargetPixel {
  bool valid;  // the pixel counts
  acc_t y;     // Y of the class, 0 where the pixel does not count
};

template <typename label_t>
struct LabelTarget {
  static constexpr bool kFloat = false;
  static constexpr bool kRegion = false;
  const label_t* labels;
  struct View {  // an image's label map, or one row of it (every class reads the same)
    const label_t* l;
  };
};

template <typename value_t>
struct FloatTarget {
  static constexpr bool kFloat = true;
  static constexpr bool kRegion = false;
  const value_t* values;
  int64_t c_stride;
  const bool* mask;  // contiguous [N, H, W], or null: every pixel counts
  struct View {   // plane (n, c) of the target and image n of the mask, or one row of both
    const value_t* v;
    const bool* m;
  };
};

template <typename value_t>
struct RegionTarget : FloatTarget<value_t> {
  static constexpr bool kRegion = true;
};

template <typename label_t>
RMI_HD typename LabelTarget<label_t>::View target_plane(const LabelTarget<label_t>& t,
                                                        const Problem& g, int64_t n, int64_t) {
  return {t.labels + n * g.ls[0]};
}

template <typename value_t>
RMI_HD typename FloatTarget<value_t>::View target_plane(const FloatTarget<value_t>& t,
                                                        const Problem& g, int64_t n, int64_t c) {
  return {t.values + n * g.ls[0] + c * t.c_stride,
          t.mask != nullptr ? t.mask + n * g.H() * g.W() : nullptr};
}

template <typename label_t>
RMI_HD typename LabelTarget<label_t>::View target_row(
    const LabelTarget<label_t>&, const typename LabelTarget<label_t>::View& plane,
    const Problem& g, int64_t y) {
  return {plane.l + y * g.ls[1]};
}

template <typename value_t>
RMI_HD typename FloatTarget<value_t>::View target_row(
    const FloatTarget<value_t>& t, const typename FloatTarget<value_t>::View& plane,
    const Problem& g, int64_t y) {
  return {plane.v + y * g.ls[1], plane.m != nullptr ? plane.m + y * g.W() : nullptr};
}

template <typename acc_t, typename label_t>
RMI_HD TargetPixel<acc_t> target_at(const LabelTarget<label_t>&,
                                    const typename LabelTarget<label_t>::View& row,
                                    const Problem& g, int64_t c, int64_t x) {
  const int64_t label = static_cast<int64_t>(row.l[x * g.ls[2]]);
  const bool valid = is_valid_label(label, g.C, g.ignore_index);
  return {valid, (valid && label == c) ? acc_t(1) : acc_t(0)};
}

template <typename acc_t, typename value_t>
RMI_HD TargetPixel<acc_t> target_at(const FloatTarget<value_t>& t,
                                    const typename FloatTarget<value_t>::View& row,
                                    const Problem& g, int64_t, int64_t x) {
  const bool valid = row.m == nullptr || row.m[x];
  return {valid, valid ? static_cast<acc_t>(row.v[x * g.ls[2]]) : acc_t(0)};
}

// The label of pixel (n, y, x) and whether the mask counts pixel (n, y, x).
template <typename label_t>
RMI_HD int64_t label_at(const LabelTarget<label_t>& t, const Problem& g, int64_t n, int64_t y,
                        int64_t x) {
  return static_cast<int64_t>(t.labels[n * g.ls[0] + y * g.ls[1] + x * g.ls[2]]);
}

template <typename value_t>
RMI_HD bool mask_at(const FloatTarget<value_t>& t, const Problem& g, int64_t n, int64_t y,
                   int64_t x) {
  return t.mask == nullptr || t.mask[(n * g.H() + y) * g.W() + x];
}

// ---- per-pixel helpers ---------------------------------------------------------------------

template <typename acc_t, typename scalar_t>
RMI_HD acc_t logit_at(const scalar_t* logits, const Problem& g, int64_t n, int64_t c,
                      int64_t y, int64_t x) {
  return static_cast<acc_t>(logits[n * g.xs[0] + c * g.xs[1] + y * g.xs[2] + x * g.xs[3]]);
}

// log(sum_c exp(x_c)) over the channels of one pixel.
template <typename acc_t, typename scalar_t>
RMI_HD acc_t logsumexp_at(const scalar_t* logits, const Problem& g, int64_t n, int64_t y,
                          int64_t x) {
  acc_t top = logit_at<acc_t>(logits, g, n, 0, y, x);
  for (int64_t c = 1; c < g.C; ++c) {
    acc_t v = logit_at<acc_t>(logits, g, n, c, y, x);
    top = v > top ? v : top;
  }
  acc_t sum = acc_t(0);
  for (int64_t c = 0; c < g.C; ++c) sum += exp(logit_at<acc_t>(logits, g, n, c, y, x) - top);
  return top + log(sum);
}

// P (rmi_prob; region mode: the map times the mask) and Y of class c at one full-resolution
// pixel.
template <typename acc_t>
struct PY {
  acc_t p;
  acc_t y;
};

// The same from row views: x_row = the logits of plane (n, c) at row y, t_row = the target's
// row y of that plane (target_row; the pooling loops walk rows with them).
template <typename acc_t, typename scalar_t, typename Target>
RMI_HD PY<acc_t> row_pixel_py(const scalar_t* x_row, const Target& t,
                              const typename Target::View& t_row, const Problem& g, int64_t c,
                              int64_t x) {
  const TargetPixel<acc_t> tp = target_at<acc_t>(t, t_row, g, c, x);
  const acc_t v = static_cast<acc_t>(x_row[x * g.xs[3]]);
  if (Target::kRegion) return {tp.valid ? v : acc_t(0), tp.y};
  const acc_t sig = sigmoid_parts(v).sig;
  return {rmi_prob(sig, tp.valid, g.mode), tp.y};
}

template <typename acc_t, typename scalar_t, typename Target>
RMI_HD PY<acc_t> pixel_py(const scalar_t* logits, const Target& t, const Problem& g, int64_t n,
                          int64_t c, int64_t y, int64_t x) {
  return row_pixel_py<acc_t>(logits + n * g.xs[0] + c * g.xs[1] + y * g.xs[2], t,
                             target_row(t, target_plane(t, g, n, c), g, y), g, c, x);
}

// ---- stage (a): first term and pooled maps ---------------------------------------------------

// First-term contribution of pixel q of [N, H, W]: loss summed over classes (BCE) or the
// pixel's CE, 1 if the pixel counts, and the number of non-finite logits at the pixel.
struct FirstTermSums {
  double sum;
  double count;
  int64_t nonfinite;
};

// Pixel (n, y, x) with integer labels.
template <typename acc_t, typename scalar_t, typename label_t>
RMI_HD FirstTermSums first_term_pixel(const scalar_t* logits, const LabelTarget<label_t>& t,
                                      const Problem& g, int64_t n, int64_t y, int64_t x) {
  int64_t label = label_at(t, g, n, y, x);
  bool valid = is_valid_label(label, g.C, g.ignore_index);
  FirstTermSums s = {0.0, valid ? 1.0 : 0.0, 0};
  for (int64_t c = 0; c < g.C; ++c) {
    acc_t v = logit_at<acc_t>(logits, g, n, c, y, x);
    if (!isfinite(v)) ++s.nonfinite;
    if (g.mode == kSigmoidMode && valid)
      s.sum += static_cast<double>(bce_with_logits(v, label == c, sigmoid_parts(v).e));
  }
  if (g.mode == kSoftmaxMode && valid)
    s.sum = static_cast<double>(logsumexp_at<acc_t>(logits, g, n, y, x) -
                                logit_at<acc_t>(logits, g, n, label, y, x));
  return s;
}

// Pixel (n, y, x) with a float target: the BCE with the target's values, or the soft CE
// -sum_c Y_c log_softmax_c = (sum_c Y_c) lse - sum_c Y_c x_c, where the mask counts the pixel;
// region mode: no first term (count 0), only the non-finite values.
template <typename acc_t, typename scalar_t, typename value_t>
RMI_HD FirstTermSums first_term_pixel(const scalar_t* logits, const FloatTarget<value_t>& t,
                                      const Problem& g, int64_t n, int64_t y, int64_t x) {
  const bool counts = g.mode != kRegionMode && mask_at(t, g, n, y, x);
  FirstTermSums s = {0.0, counts ? 1.0 : 0.0, 0};
  const value_t* values = t.values + n * g.ls[0] + y * g.ls[1] + x * g.ls[2];
  acc_t y_sum = acc_t(0), yx_sum = acc_t(0);
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t v = logit_at<acc_t>(logits, g, n, c, y, x);
    if (!isfinite(v)) ++s.nonfinite;
    if (!counts) continue;
    const acc_t yc = static_cast<acc_t>(values[c * t.c_stride]);
    if (g.mode == kSigmoidMode)
      s.sum += static_cast<double>(bce_with_logits(v, yc, sigmoid_parts(v).e));
    else
      y_sum += yc, yx_sum += yc * v;
  }
  if (g.mode == kSoftmaxMode && counts)
    s.sum = static_cast<double>(y_sum * logsumexp_at<acc_t>(logits, g, n, y, x) - yx_sum);
  return s;
}

template <typename acc_t, typename scalar_t, typename Target>
RMI_HD FirstTermSums first_term_at(int64_t q, const scalar_t* logits, const Target& t,
                                   const Problem& g, const Divisors& dv) {
  int64_t x, y;
  const int64_t n = dv.H.divmod(dv.W.divmod(q, &x), &y);
  return first_term_pixel<acc_t>(logits, t, g, n, y, x);
}

// Softmax mode, pixel q of [N, H, W]: lse[q] = the channel log-sum-exp (the CE gradient's
// softmax is exp(x - lse)); with a float target also lse[N H W + q] = the sum over classes of
// Y (the soft CE's gradient is softmax * that sum - Y).
template <typename acc_t, typename scalar_t, typename Target>
RMI_HD void first_term_lse_store(int64_t q, const scalar_t* logits, const Target& t,
                                 const Problem& g, const Divisors& dv, acc_t* lse) {
  int64_t x, y;
  const int64_t n = dv.H.divmod(dv.W.divmod(q, &x), &y);
  lse[q] = logsumexp_at<acc_t>(logits, g, n, y, x);
  if constexpr (Target::kFloat) {
    const typename Target::View row = target_row(t, target_plane(t, g, n, 0), g, y);
    acc_t sum = acc_t(0);
    if (mask_at(t, g, n, y, x))
      for (int64_t c = 0; c < g.C; ++c)
        sum += static_cast<acc_t>(row.v[c * t.c_stride + x * g.ls[2]]);
    lse[g.N * g.H() * g.W() + q] = sum;
  }
}

// The pooled maps are computed by one instantiation per pool kind (a compile-time `kind`):
// with the three kinds in one kernel, ptxas spilled (it hoists each kind's loop invariants out
// of the grid-stride loop). Factor 1 (the identity) runs in any kind; pooled_kind() picks one.
inline int pooled_kind(const Problem& g) { return g.factor() == 1 ? int(kAvgPool) : g.pool; }

// Calls f(std::integral_constant<int, kind>{}) for a pool kind (host side).
template <typename F>
void dispatch_pool_kind(int kind, F&& f) {
  switch (kind) {
    case kMaxPool: return f(std::integral_constant<int, kMaxPool>{});
    case kInterp: return f(std::integral_constant<int, kInterp>{});
    default: return f(std::integral_constant<int, kAvgPool>{});
  }
}

// Pooled Y and P of plane (n, c) at pooled pixel (oy, ox) (torch_backend._pool), computed from
// the logits and the target, for kind == pooled_kind(g): identity for factor 1;
// avg_pool2d(k, s, k // 2, count_include_pad) (the window never reaches past the padding in
// floor mode, so the divisor is always k * k); max_pool2d (first maximum in row-major window
// order; Y the maximum of Y, a 0/1 map for labels; *arg is where the maximum of P is, as the
// row-major position in the window clipped to the map, see max_window_arg); interp: nearest Y,
// bilinear align_corners=True P (scales precomputed in dv). *arg is only written for max
// pooling with factor > 1.
template <int kind, typename acc_t, typename scalar_t, typename Target>
RMI_HD PY<acc_t> pooled_py(const scalar_t* logits, const Target& t, const Problem& g,
                           const Divisors& dv, int64_t n, int64_t c, int64_t oy, int64_t ox,
                           int32_t* arg) {
  if (g.factor() == 1) return pixel_py<acc_t>(logits, t, g, n, c, oy, ox);
  if (kind == kInterp) {
    LinearTap<acc_t> ty = linear_tap<acc_t>(oy, g.H(), dv.sh.linear<acc_t>());
    LinearTap<acc_t> tx = linear_tap<acc_t>(ox, g.W(), dv.sw.linear<acc_t>());
    acc_t p00 = pixel_py<acc_t>(logits, t, g, n, c, ty.i0, tx.i0).p;
    acc_t p01 = pixel_py<acc_t>(logits, t, g, n, c, ty.i0, tx.i1).p;
    acc_t p10 = pixel_py<acc_t>(logits, t, g, n, c, ty.i1, tx.i0).p;
    acc_t p11 = pixel_py<acc_t>(logits, t, g, n, c, ty.i1, tx.i1).p;
    acc_t p = ty.w0 * (tx.w0 * p00 + tx.w1 * p01) + ty.w1 * (tx.w0 * p10 + tx.w1 * p11);
    const int64_t sy = nearest_source(oy, g.H(), g.h(), dv.sh.nearest);
    const int64_t sx = nearest_source(ox, g.W(), g.w(), dv.sw.nearest);
    acc_t y = target_at<acc_t>(t, target_row(t, target_plane(t, g, n, c), g, sy), g, c, sx).y;
    return {p, y};
  }
  int64_t y0, y1, x0, x1;
  pool_window(oy, g.H(), g.kernel(), g.factor(), &y0, &y1);
  pool_window(ox, g.W(), g.kernel(), g.factor(), &x0, &x1);
  const scalar_t* x_plane = logits + n * g.xs[0] + c * g.xs[1];
  const typename Target::View t_plane = target_plane(t, g, n, c);
  if (kind == kAvgPool) {
    PY<acc_t> sum = {acc_t(0), acc_t(0)};
    for (int64_t y = y0; y < y1; ++y) {
      const scalar_t* x_row = x_plane + y * g.xs[2];
      const typename Target::View t_row = target_row(t, t_plane, g, y);
      for (int64_t x = x0; x < x1; ++x) {
        const PY<acc_t> v = row_pixel_py<acc_t>(x_row, t, t_row, g, c, x);
        sum.p += v.p;
        sum.y += v.y;
      }
    }
    acc_t area = static_cast<acc_t>(g.kernel() * g.kernel());
    return {sum.p / area, sum.y / area};
  }
  // Max: P's first maximum in row-major order, and Y's maximum (windows are never empty: pixel 0
  // sets both; region_mi's maps may be < 0).
  PY<acc_t> top = {acc_t(0), acc_t(0)};
  int32_t at = 0, best = 0;  // row-major position in the clipped window, of P's maximum
  for (int64_t y = y0; y < y1; ++y) {
    const scalar_t* x_row = x_plane + y * g.xs[2];
    const typename Target::View t_row = target_row(t, t_plane, g, y);
    for (int64_t x = x0; x < x1; ++x, ++at) {
      const PY<acc_t> v = row_pixel_py<acc_t>(x_row, t, t_row, g, c, x);
      if (at == 0 || v.p > top.p) top.p = v.p, best = at;
      if (at == 0 || v.y > top.y) top.y = v.y;
    }
  }
  *arg = best;
  return top;
}

// Backward, factor > 1: stores the pooled maps of a block of planes at local element q of
// [block planes, h, w] (y_out, p_out hold the block only), and the max-pooling arg-max when
// arg_out is not null (arg_out must be null unless pool is max with factor > 1).
template <int kind, typename acc_t, typename scalar_t, typename Target>
RMI_HD void pooled_maps_store(int64_t q, const scalar_t* logits, const Target& t,
                              const Problem& g, const Divisors& dv, const PlaneBlock& blk,
                              acc_t* y_out, acc_t* p_out, int32_t* arg_out) {
  int64_t ox, oy, n, c;
  block_plane(blk, dv.h.divmod(dv.w.divmod(q, &ox), &oy), &n, &c);
  int32_t arg = 0;
  PY<acc_t> v = pooled_py<kind, acc_t>(logits, t, g, dv, n, c, oy, ox, &arg);
  y_out[q] = v.y;
  p_out[q] = v.p;
  if (arg_out != nullptr) arg_out[q] = arg;
}

// ---- stage (b): moment sums ------------------------------------------------------------------
//
// Per (n, c) plane, the moment "entries" are the first-order sums sum_k y_k[i], sum_k p_k[i]
// and the product sums sum_k y_k[i] y_k[j], sum_k p_k[i] p_k[j] (i <= j only: symmetric) and
// sum_k y_k[i] p_k[j], all over windows k, on maps shifted by a per-plane constant (the plane
// mean; covariances do not change and the raw sums do not cancel). Layout of the entries:
//   [0, d) sum y_i | [d, 2d) sum p_i | S packed (i <= j) sums y_i y_j | S sums p_i p_j |
//   d*d sums y_i p_j (row-major),  with S = d (d + 1) / 2.
// No pooled map is stored: the windows' rows are split in chunks, a block of threads takes one
// plane and one chunk, and walks the chunk by tiles of windows; for each tile it computes the
// shifted pooled Y and P of the tile (plus its R - 1 halo) from the logits and the target into
// shared memory (pooled_py: at factor 1 a sigmoid per pixel), then each thread adds one
// entry's products over the tile's windows from there. The partials are bounded (plan_moments).

// Sums of the pooled Y and P of plane `plane` (of [N, C]) over its pooled pixels first,
// first + step, ... (< h w), in double: one thread's share of moment_sums_offsets_kernel
// (step = kThreads), or the whole plane (first 0, step 1); kind = pooled_kind(g).
template <int kind, typename acc_t, typename scalar_t, typename Target>
RMI_HD PY<double> plane_sums_at(int64_t plane, int64_t first, int64_t step,
                                const scalar_t* logits, const Target& t, const Problem& g,
                                const Divisors& dv) {
  int64_t c;
  const int64_t n = dv.C.divmod(plane, &c);
  PY<double> sum = {0.0, 0.0};
  for (int64_t i = first; i < g.h() * g.w(); i += step) {
    int64_t ox;
    const int64_t oy = dv.w.divmod(i, &ox);
    int32_t arg = 0;
    const PY<acc_t> v = pooled_py<kind, acc_t>(logits, t, g, dv, n, c, oy, ox, &arg);
    sum.p += static_cast<double>(v.p);
    sum.y += static_cast<double>(v.y);
  }
  return sum;
}

constexpr int kTileElems = 2048;   // staged map pixels per tile and map (2 x 16 KiB of doubles)
constexpr int kTileMaxCols = 64;   // widest staged tile

RMI_HD int64_t moment_entry_count(int64_t d) { return 2 * d + d * (d + 1) + d * d; }

// Position of (i, j), i <= j, in the packed upper triangle of a d x d matrix (row-major).
RMI_HD int64_t packed_index(int64_t i, int64_t j, int64_t d) {
  return i * d - i * (i - 1) / 2 + (j - i);
}

struct MomentEntry {
  int first;   // map of the first factor: 0 = Y, 1 = P
  int second;  // map of the second factor, -1 for a first-order sum
  int64_t i;   // region offset of the first factor
  int64_t j;   // region offset of the second factor
};

RMI_HD MomentEntry moment_entry(int64_t e, int64_t d) {
  if (e < d) return {0, -1, e, 0};
  e -= d;
  if (e < d) return {1, -1, e, 0};
  e -= d;
  int64_t packed = d * (d + 1) / 2;
  if (e < 2 * packed) {
    int map = e < packed ? 0 : 1;
    int64_t r = e < packed ? e : e - packed;
    int64_t i = 0;
    while (r >= d - i) {  // row i of the triangle holds d - i entries
      r -= d - i;
      ++i;
    }
    return {map, map, i, i + r};
  }
  e -= 2 * packed;
  return {0, 1, e / d, e % d};
}

struct MomentPlan {
  int64_t entries;         // moment_entry_count(d), at most 20300 (d <= 100)
  int64_t chunks;          // chunks of window rows (grid.y, <= 65535)
  int64_t rows_per_chunk;  // window rows per chunk
  int64_t tile_rows;       // staged tile: rows x cols map pixels (pitch tile_cols), at most
  int64_t tile_cols;       // kTileElems; a tile holds (rows - R + 1) x (cols - R + 1) windows
};

// Enough chunks for about 2^18 threads in flight, never more chunks than window rows, and
// partials (planes x chunks x entries doubles) of at most max(max_partials, planes x entries):
// the caller passes N C H W / 32, 1/4 byte per logit. Tiles: balanced column tiles at most
// kTileMaxCols wide, as many rows as fit in kTileElems (at most a chunk's).
inline MomentPlan plan_moments(int64_t planes, int64_t window_rows, int64_t window_cols,
                               int64_t radius, int64_t max_partials) {
  MomentPlan plan;
  plan.entries = moment_entry_count(radius * radius);
  const int64_t target = int64_t(1) << 18, per_chunk = planes * plan.entries;
  int64_t chunks = planes >= target ? 1 : ceil_div(target, per_chunk);
  const int64_t room = max_partials / per_chunk;
  chunks = chunks > room ? room : chunks;
  int64_t most = window_rows < kMaxGridYZ ? window_rows : kMaxGridYZ;
  chunks = chunks < 1 ? 1 : (chunks > most ? most : chunks);
  plan.rows_per_chunk = ceil_div(window_rows, chunks);
  plan.chunks = ceil_div(window_rows, plan.rows_per_chunk);
  const int64_t col_tiles = ceil_div(window_cols, kTileMaxCols - radius + 1);
  plan.tile_cols = ceil_div(window_cols, col_tiles) + radius - 1;
  const int64_t rows = kTileElems / plan.tile_cols;  // >= 32 >= R
  plan.tile_rows = rows < plan.rows_per_chunk + radius - 1 ? rows
                                                           : plan.rows_per_chunk + radius - 1;
  return plan;
}

// The windows [a0, a1) x [b0, b1) of one tile; it stages map rows [a0, a1 + R - 1) and columns
// [b0, b1 + R - 1).
struct MomentTile {
  int64_t a0, a1, b0, b1;
};

// The tiles of one chunk of window rows [a_begin, a_end): row_tiles x col_tiles, walked
// row-major (tile t = moment_tile(ct, t, ...)), each tile_rows - R + 1 window rows and
// tile_cols - R + 1 window columns (fewer at the ends).
struct ChunkTiles {
  int64_t a_begin, a_end, nw;
  int64_t col_tiles, count;
};

RMI_HD ChunkTiles chunk_tiles(const Problem& g, const MomentPlan& plan, int64_t chunk) {
  const int64_t R = g.radius(), nh = g.h() - R + 1, nw = g.w() - R + 1;
  const int64_t a_begin = chunk * plan.rows_per_chunk;
  const int64_t a_end = a_begin + plan.rows_per_chunk < nh ? a_begin + plan.rows_per_chunk : nh;
  const int64_t col_tiles = ceil_div(nw, plan.tile_cols - R + 1);
  return {a_begin, a_end, nw, col_tiles,
          ceil_div(a_end - a_begin, plan.tile_rows - R + 1) * col_tiles};
}

RMI_HD MomentTile moment_tile(const ChunkTiles& ct, int64_t t, const MomentPlan& plan,
                              int64_t R) {
  const int64_t tr = t / ct.col_tiles, tc = t - tr * ct.col_tiles;
  const int64_t a0 = ct.a_begin + tr * (plan.tile_rows - R + 1), b0 = tc * (plan.tile_cols - R + 1);
  const int64_t a1 = a0 + plan.tile_rows - R + 1, b1 = b0 + plan.tile_cols - R + 1;
  return {a0, a1 < ct.a_end ? a1 : ct.a_end, b0, b1 < ct.nw ? b1 : ct.nw};
}

// Staged pixels of a tile: tile_rows_of x tile_cols_of, at most the plan's tile_rows x
// tile_cols (<= kTileElems).
RMI_HD int tile_rows_of(const MomentTile& t, int64_t R) {
  return static_cast<int>(t.a1 - t.a0 + R - 1);
}
RMI_HD int tile_cols_of(const MomentTile& t, int64_t R) {
  return static_cast<int>(t.b1 - t.b0 + R - 1);
}

// Stages pixel idx (< tile_rows_of x tile_cols_of) of a tile of plane (n, c): with at =
// r * plan.tile_cols + col, tile[at] and tile[kTileElems + at] = the pooled Y and P at map pixel
// (a0 + r, b0 + col) minus the plane's offsets (oy, op), in double. tile [2 * kTileElems].
template <int kind, typename acc_t, typename scalar_t, typename Target>
RMI_HD void moment_stage_at(int idx, const MomentTile& tl, int64_t n, int64_t c, double oy,
                            double op, const scalar_t* logits, const Target& t,
                            const Problem& g, const Divisors& dv, const MomentPlan& plan,
                            double* tile) {
  const int cols = tile_cols_of(tl, g.radius());
  const int r = idx / cols, col = idx - r * cols;
  int32_t arg = 0;
  const PY<acc_t> v =
      pooled_py<kind, acc_t>(logits, t, g, dv, n, c, tl.a0 + r, tl.b0 + col, &arg);
  const int at = r * static_cast<int>(plan.tile_cols) + col;
  tile[at] = static_cast<double>(v.y) - oy;
  tile[kTileElems + at] = static_cast<double>(v.p) - op;
}

// Where entry m reads a staged tile: its factors start at tile + a and tile + b (window (0, 0)),
// b unused for a first-order sum.
struct EntryTaps {
  int a, b;
  bool product;
};

RMI_HD EntryTaps entry_taps(const MomentEntry& m, const MomentPlan& plan, int64_t R) {
  const int pitch = static_cast<int>(plan.tile_cols), r = static_cast<int>(R);
  const int i = static_cast<int>(m.i), j = static_cast<int>(m.j);
  const int a = m.first * kTileElems + (i / r) * pitch + (i % r);
  const int b = m.second < 0 ? 0 : m.second * kTileElems + (j / r) * pitch + (j % r);
  return {a, b, m.second >= 0};
}

// Adds an entry over the windows of a staged tile to acc (windows row-major).
RMI_HD double moment_tile_accumulate(double acc, const EntryTaps& e, const MomentTile& t,
                                     const double* tile, const MomentPlan& plan) {
  const int pitch = static_cast<int>(plan.tile_cols);
  const int rows = static_cast<int>(t.a1 - t.a0), cols = static_cast<int>(t.b1 - t.b0);
  const double* fa = tile + e.a;
  if (!e.product) {
    for (int a = 0; a < rows; ++a)
      for (int b = 0; b < cols; ++b) acc += fa[a * pitch + b];
    return acc;
  }
  const double* fb = tile + e.b;
  for (int a = 0; a < rows; ++a)
    for (int b = 0; b < cols; ++b) acc += fa[a * pitch + b] * fb[a * pitch + b];
  return acc;
}

// Entry e of a plane summed over its chunks (fixed order). partials [planes, chunks, entries].
RMI_HD double moment_total(const double* partials, int64_t plane, int64_t e,
                           const MomentPlan& plan) {
  double sum = 0.0;
  for (int64_t ch = 0; ch < plan.chunks; ++ch)
    sum += partials[(plane * plan.chunks + ch) * plan.entries + e];
  return sum;
}

// Element q of [planes, d, d]: the centred Sy, Sp, B entries (i, j), cov [planes, 3, d, d]
// (S - K mu_i mu_j, with mu the shifted means), and for j == 0 the means [planes, 2, d]
// (mu_y, mu_p plus the offsets). The symmetric Sy, Sp are exactly symmetric.
RMI_HD void moment_sums_finalize_at(int64_t q, const double* partials, const double* offsets,
                                    const Problem& g, const MomentPlan& plan, double* means,
                                    double* cov) {
  const int64_t R = g.radius(), d = R * R;
  const int64_t j = q % d, t = q / d;
  const int64_t i = t % d, plane = t / d;
  const double k = static_cast<double>((g.h() - R + 1) * (g.w() - R + 1));
  const int64_t lo = i < j ? i : j, hi = i < j ? j : i;
  const int64_t packed = d * (d + 1) / 2;
  const double mu_y_i = moment_total(partials, plane, i, plan) / k;
  const double mu_p_i = moment_total(partials, plane, d + i, plan) / k;
  const double mu_y_j = moment_total(partials, plane, j, plan) / k;
  const double mu_p_j = moment_total(partials, plane, d + j, plan) / k;
  const double mu_y_lo = lo == i ? mu_y_i : mu_y_j, mu_y_hi = lo == i ? mu_y_j : mu_y_i;
  const double mu_p_lo = lo == i ? mu_p_i : mu_p_j, mu_p_hi = lo == i ? mu_p_j : mu_p_i;
  const double syy = moment_total(partials, plane, 2 * d + packed_index(lo, hi, d), plan);
  const double spp =
      moment_total(partials, plane, 2 * d + packed + packed_index(lo, hi, d), plan);
  const double byp = moment_total(partials, plane, 2 * d + 2 * packed + i * d + j, plan);
  double* out = cov + plane * 3 * d * d + i * d + j;
  out[0] = syy - k * mu_y_lo * mu_y_hi;
  out[d * d] = spp - k * mu_p_lo * mu_p_hi;
  out[2 * d * d] = byp - k * mu_y_i * mu_p_j;
  if (j == 0) {
    means[plane * 2 * d + i] = mu_y_i + offsets[2 * plane];
    means[plane * 2 * d + d + i] = mu_p_i + offsets[2 * plane + 1];
  }
}

// ---- stage (d): pooled-map stencil gradient --------------------------------------------------
//
// dloss/dP at pixel (row, col) of a pooled map [h, w], float64: window k gets
// g_k = Cp p_k + Cy y_k + c, and entry i of g_k lands on pixel k + o_i. Gathered by lag
// l = o_j - o_i: for each neighbour u + l (read once), the coefficients Cp[i, j], Cy[i, j] of the
// pairs with that lag whose window u - o_i is valid are summed, then multiplied by P and Y
// there. The maps come from a source: stored pooled maps (MapSource, factor > 1) or the logits
// and the target (PixelSource, factor 1: no map at all).

template <typename acc_t>
struct MapSource {  // stored pooled maps of one plane [h, w]
  const acc_t* y;
  const acc_t* p;
  int64_t w;
  RMI_HD PY<acc_t> operator()(int64_t row, int64_t col) const {
    const int64_t at = row * w + col;
    return {p[at], y[at]};
  }
};

template <typename acc_t, typename scalar_t, typename Target>
struct PixelSource {  // factor 1: P and Y of plane (n, c) from the logits and the target
  const scalar_t* x_plane;           // logits of the plane
  const Target* t;
  typename Target::View t_plane;     // target_plane(*t, g, n, c)
  const Problem* g;
  int64_t c;
  RMI_HD PY<acc_t> operator()(int64_t row, int64_t col) const {
    return row_pixel_py<acc_t>(x_plane + row * g->xs[2], *t, target_row(*t, t_plane, *g, row),
                               *g, c, col);
  }
};

// coef_plane: the plane's [2, d, d] (Cp, Cy); shift_plane: its [d]. Offsets and lags are
// int (R <= 10); only the pixel's position is int64.
template <typename Source>
RMI_HD double stencil_at(int64_t row, int64_t col, const Problem& g, const double* coef_plane,
                         const double* shift_plane, const Source& src) {
  const int R = static_cast<int>(g.radius()), d = R * R;
  const double* cp = coef_plane;
  const double* cy = coef_plane + d * d;
  // Offsets (iy, ix) of this pixel in the valid windows (row - iy, col - ix), 0 <= row - iy <=
  // h - R: inclusive ranges.
  const int64_t below = g.h() - 1 - row, right = g.w() - 1 - col;  // pixels after this one
  const int iy_lo = below < R - 1 ? R - 1 - static_cast<int>(below) : 0;
  const int iy_hi = row < R - 1 ? static_cast<int>(row) : R - 1;
  const int ix_lo = right < R - 1 ? R - 1 - static_cast<int>(right) : 0;
  const int ix_hi = col < R - 1 ? static_cast<int>(col) : R - 1;
  double grad = 0.0;
  for (int iy = iy_lo; iy <= iy_hi; ++iy)
    for (int ix = ix_lo; ix <= ix_hi; ++ix) grad += shift_plane[iy * R + ix];
  for (int ly = 1 - R; ly < R; ++ly) {
    // j = i + l must be an offset too: 0 <= iy + ly < R.
    const int y_lo = iy_lo > -ly ? iy_lo : -ly;
    const int y_hi = iy_hi < R - 1 - ly ? iy_hi : R - 1 - ly;
    if (y_lo > y_hi) continue;
    for (int lx = 1 - R; lx < R; ++lx) {
      const int x_lo = ix_lo > -lx ? ix_lo : -lx;
      const int x_hi = ix_hi < R - 1 - lx ? ix_hi : R - 1 - lx;
      if (x_lo > x_hi) continue;
      const int lag = ly * R + lx;
      double sum_p = 0.0, sum_y = 0.0;
      for (int iy = y_lo; iy <= y_hi; ++iy)
        for (int ix = x_lo; ix <= x_hi; ++ix) {
          const int ij = (iy * R + ix) * (d + 1) + lag;  // i * d + j, j = i + lag
          sum_p += cp[ij];
          sum_y += cy[ij];
        }
      const auto v = src(row + ly, col + lx);
      grad += sum_p * static_cast<double>(v.p) + sum_y * static_cast<double>(v.y);
    }
  }
  return grad;
}

// Backward, factor > 1: the stencil at local element q of a block's pooled maps [block planes,
// h, w] (y, p and grad_pooled hold the block only). coef [N, C, 2, d, d], shift [N, C, d].
template <typename acc_t>
RMI_HD void pooled_grad_stencil_store(int64_t q, const acc_t* y, const acc_t* p, const double* coef,
                                      const double* shift, const Problem& g, const Divisors& dv,
                                      const PlaneBlock& blk, acc_t* grad_pooled) {
  const int64_t d = g.radius() * g.radius();
  int64_t col, row, n, c;
  const int64_t lp = dv.h.divmod(dv.w.divmod(q, &col), &row);
  block_plane(blk, lp, &n, &c);
  const int64_t plane = n * g.C + c, size = g.h() * g.w();
  const MapSource<acc_t> src = {y + lp * size, p + lp * size, g.w()};
  grad_pooled[q] = static_cast<acc_t>(
      stencil_at(row, col, g, coef + plane * 2 * d * d, shift + plane * d, src));
}

// ---- stage (e): full-resolution gradient -----------------------------------------------------

// Pooled outputs o whose pool window [o s - k/2, o s - k/2 + k) holds input index i: [*lo, *hi].
RMI_HD void windows_holding(int64_t i, int64_t n_out, int64_t kernel, const FastDivmod& stride,
                            int64_t* lo, int64_t* hi) {
  const int64_t first = i + kernel / 2 - kernel + 1;  // o s >= first
  *lo = first <= 0 ? 0 : stride.div(first + stride.divisor - 1);
  const int64_t last = stride.div(i + kernel / 2);  // o s <= i + k/2
  *hi = last < n_out - 1 ? last : n_out - 1;
}

// Pooled outputs o whose bilinear (align_corners=True) taps may touch input index i: a range
// with a margin of one output on each side; the caller checks the taps exactly.
RMI_HD void taps_holding(int64_t i, int64_t n_in, int64_t n_out, int64_t* lo, int64_t* hi) {
  if (n_out <= 1) {
    *lo = 0;
    *hi = n_out - 1;
    return;
  }
  const double scale = static_cast<double>(n_in - 1) / static_cast<double>(n_out - 1);
  const int64_t first = static_cast<int64_t>(floor((i - 1) / scale)) - 1;
  const int64_t last = static_cast<int64_t>(ceil((i + 1) / scale)) + 1;
  *lo = first < 0 ? 0 : first;
  *hi = last < n_out - 1 ? last : n_out - 1;
}

// Weight of input index i in the bilinear taps of output o (both taps may be i at the border);
// scale = linear_scale<acc_t>(n_in, n_out).
template <typename acc_t>
RMI_HD acc_t tap_weight(int64_t o, int64_t i, int64_t n_in, acc_t scale) {
  LinearTap<acc_t> tap = linear_tap<acc_t>(o, n_in, scale);
  return (tap.i0 == i ? tap.w0 : acc_t(0)) + (tap.i1 == i ? tap.w1 : acc_t(0));
}

// Row-major position of input pixel (y, x) in the window [y0, y1) x [x0, x1) (the pool window
// clipped to the map): what pooled_py records as the max-pooling arg-max. It is below the
// window's area, so an int32 holds it (rmi_cuda.cu checks the area).
RMI_HD int64_t max_window_arg(int64_t y, int64_t x, int64_t y0, int64_t x0, int64_t x1) {
  return (y - y0) * (x1 - x0) + (x - x0);
}

// Adjoint of the downsampling (factor > 1) of P at input pixel (y, x) of one plane: the pooled
// gradient gathered from every pooled output whose value depends on P[y, x]. grad_plane,
// arg_plane: the plane's pooled gradient and (max pooling) arg-max [h, w].
template <typename acc_t>
RMI_HD acc_t pool_adjoint_at(const Problem& g, const Divisors& dv, const acc_t* grad_plane,
                             const int32_t* arg_plane, int64_t y, int64_t x) {
  int64_t oy0, oy1, ox0, ox1;
  acc_t sum = acc_t(0);
  if (g.pool == kInterp) {
    const acc_t scale_y = dv.sh.linear<acc_t>(), scale_x = dv.sw.linear<acc_t>();
    taps_holding(y, g.H(), g.h(), &oy0, &oy1);
    taps_holding(x, g.W(), g.w(), &ox0, &ox1);
    for (int64_t oy = oy0; oy <= oy1; ++oy) {
      const acc_t wy = tap_weight<acc_t>(oy, y, g.H(), scale_y);
      if (wy == acc_t(0)) continue;
      for (int64_t ox = ox0; ox <= ox1; ++ox) {
        const acc_t wx = tap_weight<acc_t>(ox, x, g.W(), scale_x);
        if (wx != acc_t(0)) sum += wy * wx * grad_plane[oy * g.w() + ox];
      }
    }
    return sum;
  }
  windows_holding(y, g.h(), g.kernel(), dv.factor, &oy0, &oy1);
  windows_holding(x, g.w(), g.kernel(), dv.factor, &ox0, &ox1);
  if (g.pool == kAvgPool) {
    for (int64_t oy = oy0; oy <= oy1; ++oy)
      for (int64_t ox = ox0; ox <= ox1; ++ox) sum += grad_plane[oy * g.w() + ox];
    return sum / static_cast<acc_t>(g.kernel() * g.kernel());
  }
  // Max: the gradient goes to the window's first maximum of P in row-major order, recorded by
  // pooled_py in the backward's pooled-maps pass.
  for (int64_t oy = oy0; oy <= oy1; ++oy) {
    int64_t y0, y1;
    pool_window(oy, g.H(), g.kernel(), g.factor(), &y0, &y1);
    for (int64_t ox = ox0; ox <= ox1; ++ox) {
      int64_t x0, x1;
      pool_window(ox, g.W(), g.kernel(), g.factor(), &x0, &x1);
      if (arg_plane[oy * g.w() + ox] == max_window_arg(y, x, y0, x0, x1))
        sum += grad_plane[oy * g.w() + ox];
    }
  }
  return sum;
}

// Local element q of the gradient of a block of planes (visited in [images, channels, H, W]
// order, or [images, H, W, channels] for a channels-last output): dloss/dP times dP/dx, plus
// base_scale times the first term's gradient (BCE: m (sig - y); CE: m (softmax - y), a float
// target's soft CE m (softmax sum_c Y_c - y); lse from first_term_lse_store, unused in sigmoid
// mode; region mode: dP/dx = m, no first term). dloss/dP:
//   fused (factor 1, the block is every plane): the stencil at the pixel, with P and Y
//     recomputed from the logits and the target (stencil_at with a PixelSource); coef, shift as
//     in pooled_grad_stencil_store; grad_pooled and argmax unused.
//   else: the pooling adjoint of grad_pooled [block planes, h, w] (pooled_grad_stencil_store),
//     with argmax [block planes, h, w] from pooled_maps_store (max pooling; null otherwise).
// base_scale points to one double; out is the whole gradient, written through os.
template <bool fused, typename acc_t, typename scalar_t, typename Target>
RMI_HD void full_res_grad_store(int64_t q, const scalar_t* logits, const Target& t,
                                const Problem& g, const Divisors& dv, const PlaneBlock& blk,
                                const double* coef, const double* shift, const acc_t* grad_pooled,
                                const int32_t* argmax, const acc_t* lse, const double* base_scale,
                                scalar_t* out, const OutStrides& os) {
  int64_t dn, dc, y, x;
  if (os.channels_last)
    dn = dv.H.divmod(dv.W.divmod(blk.channel_div.divmod(q, &dc), &x), &y);
  else
    dn = blk.channel_div.divmod(dv.H.divmod(dv.W.divmod(q, &x), &y), &dc);
  const int64_t n = blk.n0 + dn, c = blk.c0 + dc;
  const typename Target::View t_plane = target_plane(t, g, n, c);
  const TargetPixel<acc_t> tp = target_at<acc_t>(t, target_row(t, t_plane, g, y), g, c, x);
  const bool region = Target::kRegion;
  const acc_t v = logit_at<acc_t>(logits, g, n, c, y, x);
  const acc_t sig = region ? v : sigmoid_parts(v).sig;
  const acc_t slope =
      region ? (tp.valid ? acc_t(1) : acc_t(0)) : rmi_prob_slope(sig, tp.valid, g.mode);
  acc_t grad_p = acc_t(0);
  if (slope != acc_t(0)) {
    if (fused) {
      const int64_t plane = n * g.C + c, d = g.radius() * g.radius();
      const PixelSource<acc_t, scalar_t, Target> src = {logits + n * g.xs[0] + c * g.xs[1], &t,
                                                        t_plane, &g, c};
      grad_p = static_cast<acc_t>(
          stencil_at(y, x, g, coef + plane * 2 * d * d, shift + plane * d, src));
    } else {
      const int64_t at = (dn * blk.channels + dc) * g.h() * g.w();
      grad_p = pool_adjoint_at<acc_t>(g, dv, grad_pooled + at,
                                      argmax != nullptr ? argmax + at : nullptr, y, x);
    }
  }
  acc_t base = acc_t(0);
  if (tp.valid && !region) {
    const int64_t pixel = (n * g.H() + y) * g.W() + x;
    acc_t prob = g.mode == kSigmoidMode ? sig : exp(v - lse[pixel]);
    if (Target::kFloat && g.mode == kSoftmaxMode) prob *= lse[g.N * g.H() * g.W() + pixel];
    base = prob - tp.y;
  }
  const acc_t value = grad_p * slope + static_cast<acc_t>(*base_scale) * base;
  out[n * os.s[0] + c * os.s[1] + y * os.s[2] + x * os.s[3]] = static_cast<scalar_t>(value);
}

// ---- launch plans ----------------------------------------------------------------------------

// The grid of every launch of one call (blocks of kThreads threads), within CUDA's limits at
// any size: gridDim.x <= 2^30 (grid-stride loops and the plane loops cover the rest),
// gridDim.y = moment chunks <= 65535, gridDim.z = ceil(entries / kThreads) <= 80.
struct LaunchPlan {
  unsigned int first_term_blocks;  // first_term_kernel: reduce_blocks(N H W), its partials
  unsigned int pixel_blocks;       // first_term_lse_kernel over [N, H, W]
  unsigned int plane_blocks;       // moment_sums_offsets_kernel: a block per plane (then a loop)
  unsigned int finalize_blocks;    // moment_sums_finalize_kernel over [N, C, d, d]
  MomentPlan moments;
  dim3 moment_grid;  // moment_sums_partials_kernel: (plane_blocks, chunks, entry blocks)
};

inline LaunchPlan plan_launches(const Problem& g) {
  const int64_t planes = g.N * g.C;
  LaunchPlan plan;
  plan.first_term_blocks = reduce_blocks(g.N * g.H() * g.W());
  plan.pixel_blocks = grid_blocks(g.N * g.H() * g.W());
  plan.plane_blocks = static_cast<unsigned int>(planes < kMaxGridBlocks ? planes : kMaxGridBlocks);
  plan.finalize_blocks = grid_blocks(planes * g.d * g.d);
  plan.moments = plan_moments(planes, g.h() - g.radius() + 1, g.w() - g.radius() + 1, g.radius(),
                              planes * g.H() * g.W() / 32);
  plan.moment_grid = dim3(plan.plane_blocks, static_cast<unsigned int>(plan.moments.chunks),
                          static_cast<unsigned int>(ceil_div(plan.moments.entries, kThreads)));
  return plan;
}

// Bytes of backward scratch a call may hold besides the gradient: 1/16 of the logits' bytes.
constexpr int64_t kScratchFraction = 16;

// The backward in blocks of planes. Factor 1: one block of every plane, the fused
// full_res_grad pass, no scratch. Factor > 1: per block, pooled_maps_kernel (y, p and the
// max-pooling arg-max), pooled_grad_stencil_kernel (grad_pooled), full_res_grad_kernel; the
// scratch of a block, scratch_planes x h x w x (3 acc_t + 4 bytes for an arg-max), fits in
// N C H W x logit_bytes / kScratchFraction, or holds one plane when a plane alone is bigger.
struct BackwardPlan {
  int64_t images, channels;  // planes of a block: images x channels (channels == C or images == 1)
  int64_t blocks;            // blocks of planes, walked in order (block_of)
  int64_t blocks_per_image;  // channel blocks per image (1 for whole-image blocks)
  int64_t scratch_planes;    // planes of the scratch maps (0: none)
  int64_t scratch_bytes;     // their bytes
  unsigned int pooled_blocks;  // pooled_maps_kernel, pooled_grad_stencil_kernel over
                               // [block planes, h, w]
  unsigned int full_blocks;    // full_res_grad_kernel over [block planes, H, W]
};

// max_block_planes > 0 caps the planes of a block (the tests use it to force small blocks).
inline BackwardPlan plan_backward(const Problem& g, int64_t logit_bytes, int64_t acc_bytes,
                                  bool argmax, int64_t max_block_planes = 0) {
  BackwardPlan plan;
  const int64_t planes = g.N * g.C;
  int64_t per_block = planes;
  if (g.factor() > 1) {
    const int64_t plane_bytes = g.h() * g.w() * (3 * acc_bytes + (argmax ? 4 : 0));
    const int64_t budget = planes * g.H() * g.W() * logit_bytes / kScratchFraction;
    per_block = budget / plane_bytes;
  }
  if (max_block_planes > 0 && per_block > max_block_planes) per_block = max_block_planes;
  per_block = per_block < 1 ? 1 : (per_block > planes ? planes : per_block);
  if (per_block >= g.C) {
    plan.images = per_block / g.C;
    plan.channels = g.C;
    plan.blocks_per_image = 1;
    plan.blocks = ceil_div(g.N, plan.images);
  } else {
    plan.images = 1;
    plan.channels = per_block;
    plan.blocks_per_image = ceil_div(g.C, per_block);
    plan.blocks = g.N * plan.blocks_per_image;
  }
  const int64_t block_planes = plan.images * plan.channels;
  plan.scratch_planes = g.factor() > 1 ? block_planes : 0;
  plan.scratch_bytes = plan.scratch_planes * g.h() * g.w() * (3 * acc_bytes + (argmax ? 4 : 0));
  plan.pooled_blocks = grid_blocks(block_planes * g.h() * g.w());
  plan.full_blocks = grid_blocks(block_planes * g.H() * g.W());
  return plan;
}

// Block k of a backward plan (k < plan.blocks); the last ones may be smaller.
inline PlaneBlock block_of(const Problem& g, const BackwardPlan& plan, int64_t k) {
  if (plan.blocks_per_image == 1) {
    const int64_t n0 = k * plan.images, left = g.N - n0;
    return make_plane_block(n0, 0, left < plan.images ? left : plan.images, g.C);
  }
  const int64_t n0 = k / plan.blocks_per_image;
  const int64_t c0 = (k % plan.blocks_per_image) * plan.channels, left = g.C - c0;
  return make_plane_block(n0, c0, 1, left < plan.channels ? left : plan.channels);
}

// ---- kernels ---------------------------------------------------------------------------------

#if defined(__CUDACC__)

// The target is a __grid_constant__ parameter: the per-element functions read it by reference,
// and without the qualifier that cost a local copy (ptxas spilled pooled_maps_kernel, interp,
// on sm_80 when labels became a LabelTarget).
#define RMI_GRID_STRIDE_LOOP(q, n)                                                      \
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < (n); \
       q += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Sum of v over the block (blockDim.x == kThreads); every thread gets the result.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (static_cast<int>(threadIdx.x) < width) smem[threadIdx.x] += smem[threadIdx.x + width];
    __syncthreads();
  }
  T total = smem[0];
  __syncthreads();  // smem may be reused right after
  return total;
}

// Stage (a), first term, level 1: per-block sums over pixels of [N, H, W].
// part_sum, part_count, part_nonfinite [gridDim.x]. Launch: reduce_blocks(N*H*W) x kThreads.
template <typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads)
    first_term_kernel(const scalar_t* logits, const __grid_constant__ Target t, Problem g,
                      Divisors dv, double* part_sum, double* part_count, int64_t* part_nonfinite) {
  __shared__ double smem[kThreads];
  __shared__ int64_t smem_i[kThreads];
  FirstTermSums s = {0.0, 0.0, 0};
  RMI_GRID_STRIDE_LOOP(q, g.N * g.H() * g.W()) {
    FirstTermSums v = first_term_at<acc_t>(q, logits, t, g, dv);
    s.sum += v.sum;
    s.count += v.count;
    s.nonfinite += v.nonfinite;
  }
  s.sum = block_sum(s.sum, smem);
  s.count = block_sum(s.count, smem);
  s.nonfinite = block_sum(s.nonfinite, smem_i);
  if (threadIdx.x == 0) {
    part_sum[blockIdx.x] = s.sum;
    part_count[blockIdx.x] = s.count;
    part_nonfinite[blockIdx.x] = s.nonfinite;
  }
}

// Stage (a), first term, level 2: the blocks' sums into 0-d outputs. Launch: 1 x kThreads.
__global__ void __launch_bounds__(kThreads)
    first_term_final_kernel(const double* part_sum, const double* part_count,
                            const int64_t* part_nonfinite, int64_t parts, double* base_sum,
                            double* base_count, int64_t* nonfinite) {
  __shared__ double smem[kThreads];
  __shared__ int64_t smem_i[kThreads];
  double sum = 0.0, count = 0.0;
  int64_t bad = 0;
  for (int64_t i = threadIdx.x; i < parts; i += kThreads) {
    sum += part_sum[i];
    count += part_count[i];
    bad += part_nonfinite[i];
  }
  sum = block_sum(sum, smem);
  count = block_sum(count, smem);
  bad = block_sum(bad, smem_i);
  if (threadIdx.x == 0) {
    *base_sum = sum;
    *base_count = count;
    *nonfinite = bad;
  }
}

// Stage (a), softmax mode: the channel log-sum-exp lse [N, H, W] of the CE gradient ([2, N, H,
// W] for a float target: then also the sum over classes of Y; see first_term_lse_store).
// Launch: LaunchPlan::pixel_blocks x kThreads.
template <typename scalar_t, typename acc_t, typename Target>
__global__ void __launch_bounds__(kThreads)
    first_term_lse_kernel(const scalar_t* logits, const __grid_constant__ Target t, Problem g,
                          Divisors dv, acc_t* lse) {
  RMI_GRID_STRIDE_LOOP(q, g.N * g.H() * g.W()) {
    first_term_lse_store<acc_t>(q, logits, t, g, dv, lse);
  }
}

// Backward (factor > 1), pooled maps of a block of planes: y_out, p_out [block planes, h, w],
// and the max-pooling arg-max arg_out (same shape) when it is not null (see pooled_maps_store);
// kind = pooled_kind(g). Launch: BackwardPlan::pooled_blocks x kThreads.
template <typename scalar_t, typename acc_t, typename Target, int kind>
__global__ void __launch_bounds__(kThreads)
    pooled_maps_kernel(const scalar_t* logits, const __grid_constant__ Target t, Problem g,
                       Divisors dv, PlaneBlock blk, acc_t* y_out, acc_t* p_out, int32_t* arg_out) {
  RMI_GRID_STRIDE_LOOP(q, blk.images * blk.channels * g.h() * g.w()) {
    pooled_maps_store<kind, acc_t>(q, logits, t, g, dv, blk, y_out, p_out, arg_out);
  }
}

// Stage (b), level 0: offsets [planes, 2], the means of the pooled Y and P of each plane (any
// constant near the values would do), computed from the logits and the target (pooled_py);
// kind = pooled_kind(g). Launch: LaunchPlan::plane_blocks x kThreads, a block per plane
// (blocks loop over planes past 2^30).
template <typename scalar_t, typename acc_t, typename Target, int kind>
__global__ void __launch_bounds__(kThreads, kPixelMinBlocks)
    moment_sums_offsets_kernel(const scalar_t* logits, const __grid_constant__ Target t,
                               Problem g, Divisors dv, double* offsets) {
  __shared__ double smem[kThreads];
  const double plane_size = static_cast<double>(g.h() * g.w());
  for (int64_t plane = blockIdx.x; plane < g.N * g.C; plane += gridDim.x) {  // block-uniform
    const PY<double> part =
        plane_sums_at<kind, acc_t>(plane, threadIdx.x, kThreads, logits, t, g, dv);
    const double sum_y = block_sum(part.y, smem), sum_p = block_sum(part.p, smem);
    if (threadIdx.x == 0) {
      offsets[2 * plane] = sum_y / plane_size;
      offsets[2 * plane + 1] = sum_p / plane_size;
    }
  }
}

// Stage (b), level 1: partials [planes, chunks, entries], from the logits and the target through
// staged tiles (see moment_stage_at, moment_tile_accumulate); kind = pooled_kind(g).
// Launch: LaunchPlan::moment_grid (plane blocks, plan.chunks, ceil(plan.entries / kThreads))
// x kThreads; threads of a block share a plane and a chunk (and stage its tiles together);
// blocks loop over planes past 2^30.
template <typename scalar_t, typename acc_t, typename Target, int kind>
__global__ void __launch_bounds__(kThreads, kMomentMinBlocks)
    moment_sums_partials_kernel(const scalar_t* logits, const __grid_constant__ Target t,
                                const double* offsets, Problem g, Divisors dv, MomentPlan plan,
                                double* partials) {
  __shared__ double tile[2 * kTileElems];  // staged Y, then P
  const int64_t chunk = blockIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.z) * kThreads + threadIdx.x;
  const bool active = e < plan.entries;  // every thread stages; active ones sum an entry
  const EntryTaps taps = entry_taps(moment_entry(active ? e : 0, g.radius() * g.radius()), plan,
                                    g.radius());
  const ChunkTiles ct = chunk_tiles(g, plan, chunk);
  for (int64_t plane = blockIdx.x; plane < g.N * g.C; plane += gridDim.x) {  // block-uniform
    int64_t c;
    const int64_t n = dv.C.divmod(plane, &c);
    const double oy = offsets[2 * plane], op = offsets[2 * plane + 1];
    double acc = 0.0;
    for (int64_t k = 0; k < ct.count; ++k) {
      const MomentTile tl = moment_tile(ct, k, plan, g.radius());
      const int pixels = tile_rows_of(tl, g.radius()) * tile_cols_of(tl, g.radius());
      for (int idx = threadIdx.x; idx < pixels; idx += kThreads)
        moment_stage_at<kind, acc_t>(idx, tl, n, c, oy, op, logits, t, g, dv, plan, tile);
      __syncthreads();
      if (active) acc = moment_tile_accumulate(acc, taps, tl, tile, plan);
      __syncthreads();  // the next tile overwrites the staged one
    }
    if (active) partials[(plane * plan.chunks + chunk) * plan.entries + e] = acc;
  }
}

// Stage (b), level 2: means [planes, 2, d], cov [planes, 3, d, d].
// Launch: LaunchPlan::finalize_blocks x kThreads.
__global__ void __launch_bounds__(kThreads)
    moment_sums_finalize_kernel(const double* partials, const double* offsets, Problem g,
                                MomentPlan plan, double* means, double* cov) {
  const int64_t d = g.radius() * g.radius();
  RMI_GRID_STRIDE_LOOP(q, g.N * g.C * d * d) {
    moment_sums_finalize_at(q, partials, offsets, g, plan, means, cov);
  }
}

// Stage (d), factor > 1: grad_pooled [block planes, h, w] from the block's maps y, p.
// Launch: BackwardPlan::pooled_blocks x kThreads.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pooled_grad_stencil_kernel(const acc_t* y, const acc_t* p, const double* coef,
                               const double* shift, Problem g, Divisors dv, PlaneBlock blk,
                               acc_t* grad_pooled) {
  RMI_GRID_STRIDE_LOOP(q, blk.images * blk.channels * g.h() * g.w()) {
    pooled_grad_stencil_store(q, y, p, coef, shift, g, dv, blk, grad_pooled);
  }
}

// Stage (e) (with stage (d) when fused, factor 1): the gradient of a block of planes through
// strides os (see full_res_grad_store). Launch: BackwardPlan::full_blocks x kThreads.
template <typename scalar_t, typename acc_t, typename Target, bool fused>
__global__ void __launch_bounds__(kThreads, kPixelMinBlocks)
    full_res_grad_kernel(const scalar_t* logits, const __grid_constant__ Target t, Problem g,
                         Divisors dv, PlaneBlock blk, const double* coef, const double* shift,
                         const acc_t* grad_pooled, const int32_t* argmax, const acc_t* lse,
                         const double* base_scale, scalar_t* out, OutStrides os) {
  RMI_GRID_STRIDE_LOOP(q, blk.images * blk.channels * g.H() * g.W()) {
    full_res_grad_store<fused, acc_t>(q, logits, t, g, dv, blk, coef, shift, grad_pooled,
                                      argmax, lse, base_scale, out, os);
  }
}

#undef RMI_GRID_STRIDE_LOOP

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace rmi
