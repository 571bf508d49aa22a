// CPU kernels of the RMI loss (backend "cpu"): the fused stages of RMI_SPEC.md section 3, for
// 2-D maps and volumes with per-axis region sides, factors and pool kernels (section 5).
//
// Every problem is read on three spatial axes z, y, x (Problem::as_volume: a 2-D problem has a
// z axis of length 1). A "row" is one line along x; the rows of a plane are numbered
// z * Y + y at full resolution and oz * y' + oy on the pooled maps.
//
// Work is split by (n, c) plane with at::parallel_for; each thread keeps scratch buffers of
// its plane: the pooled maps and their gradient (without pooling the gradient's own plane holds
// the latter, PlaneScratch::dp), and the sigmoid of the whole plane only for max and interp
// pooling (no pooling and average pooling take it one row at a time). The extra memory is then
// the class map (int16 per pixel of an image, int32 for 2^15 classes or more) and a few pooled
// planes per thread: small beside the logits for many planes (2-D: N * C of them), not at DF 1
// for a few large ones, so the plane loops run on no more threads than keep their scratch within
// a quarter of the logits' bytes (plane_grain: a volume batch of 8 planes at DF 1 runs on one
// thread).
//
// Targets: integer labels through the class map, or a float target of the logits' shape and a
// mask (RMI_SPEC.md section 6); the stages read either through ClassPlane / FloatPlane. Mode
// "region" (region_mi) reads the logits as the map P itself (times the mask), no first term.
//
// Stage names as in every backend (docs/stages.md): forward_stats, per plane: (a)
// first_term_plane (one pass over the logits: sigmoid, BCE partial sum, non-finite count; rows
// into the pooled maps at once where they can) and pooled_maps_plane (the rest of pooled P and
// Y); (b) moment_sums_plane. backward_grad, per plane: (a) again
// (recomputed, not stored), (d) pooled_grad_stencil_plane, (e) pool_adjoint_plane and
// full_res_grad_row.
//
// Both (b) and (d) use the "lag" form. For offsets o_i, o_j of a region the product sums
// sum_k X[k + o_i] Z[k + o_j] only depend on the lag l = o_j - o_i and on which offsets o_i a
// pixel u = k + o_i can take. Along each axis those sets are the same for all pixels of a
// "segment" (all interior pixels form one segment; each border pixel up to R-1 from an edge is
// its own), and a cell is a segment on each axis. So (b) accumulates, per lag and per cell, one
// dot product of two shifted maps (O(prod (2R-1)) multiply-adds per pooled pixel instead of
// O(d^2)); only for the "upper" half of the lags (l >= 0 in raster order), four products from
// one set of loads (LagSums: the lower lags' Y.P sums are P.Y sums of the opposite lag). (d) is
// a prod (2R-1) stencil whose coefficients are constant on each cell. Both
// run over blocks of rows (MomentGeometry::for_each_block) in flat loops, the border columns
// apart.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "rmi_ops.h"

namespace rmi_cpu {
namespace {

using at::Tensor;
using rmi::Problem;

// ---- per-element math that vectorises ------------------------------------------------------
// float: exp and log1p as plain polynomials (cephes coefficients, ~1 ulp) so that the row loops
// below compile to SIMD code; float64 keeps libm (it is the exactness path used by gradcheck).

// exp(t) for t <= 0 (clamped at -87, where exp is ~1.6e-38).
inline float exp_nonpos(float t) {
  t = t < -87.0f ? -87.0f : (t > 0.0f ? 0.0f : t);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  const float n = (t * 1.44269504088896341f + magic) - magic;
  const float r = (t - n * 0.693359375f) + n * 2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return q * scale;
}

// log1p(e) for e in [0, 1]: 2 atanh(z), z = e / (2 + e) <= 1/3, series to z^13.
inline float log1p_unit(float e) {
  const float z = e / (2.0f + e), z2 = z * z;
  float q = 1.0f / 13.0f;
  q = q * z2 + 1.0f / 11.0f;
  q = q * z2 + 1.0f / 9.0f;
  q = q * z2 + 1.0f / 7.0f;
  q = q * z2 + 1.0f / 5.0f;
  q = q * z2 + 1.0f / 3.0f;
  return 2.0f * z * (q * z2 + 1.0f);
}

inline double exp_nonpos(double t) { return std::exp(t > 0.0 ? 0.0 : t); }
inline double log1p_unit(double e) { return std::log1p(e); }

// ---- the three-axis view ---------------------------------------------------------------------

// Axes of a problem seen as a volume (Problem::as_volume): z, y, x.
inline const rmi::Axis& axis_z(const Problem& p) { return p.axis[0]; }
inline const rmi::Axis& axis_y(const Problem& p) { return p.axis[1]; }
inline const rmi::Axis& axis_x(const Problem& p) { return p.axis[2]; }
inline int64_t full_rows(const Problem& p) { return p.axis[0].size * p.axis[1].size; }
inline int64_t pooled_rows(const Problem& p) { return p.axis[0].pooled * p.axis[1].pooled; }
inline int64_t full_plane(const Problem& p) { return full_rows(p) * p.axis[2].size; }
inline int64_t pooled_plane(const Problem& p) { return pooled_rows(p) * p.axis[2].pooled; }
// Offset of full-resolution row r of a plane in a tensor with spatial strides sz, sy.
inline int64_t row_offset(const Problem& p, int64_t r, int64_t sz, int64_t sy) {
  return (r / p.axis[1].size) * sz + (r % p.axis[1].size) * sy;
}

// ---- label pre-pass ------------------------------------------------------------------------

// lse[col] = log sum_c exp(x_c) over the classes of one full-resolution row xr of an image
// (mx, sum: scratch of the row's length).
template <typename logit_t, typename T>
void row_logsumexp(const Problem& p, const logit_t* xr, std::vector<T>& mx, std::vector<T>& sum,
                   T* lse) {
  const int64_t W = axis_x(p).size;
  std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
  std::fill(sum.begin(), sum.end(), T(0));
  for (int64_t c = 0; c < p.C; ++c)
    for (int64_t col = 0; col < W; ++col)
      mx[col] = std::max(mx[col], static_cast<T>(xr[c * p.xs[1] + col * p.xs[4]]));
  for (int64_t c = 0; c < p.C; ++c)
    for (int64_t col = 0; col < W; ++col)
      sum[col] += exp_nonpos(static_cast<T>(xr[c * p.xs[1] + col * p.xs[4]]) - mx[col]);
  for (int64_t col = 0; col < W; ++col) lse[col] = mx[col] + std::log(sum[col]);
}

// Per pixel: class id if valid else -1 ([N, plane] of L: int16 when C < 2^15, else int32; see
// with_class_type), the number of valid pixels and, in softmax mode, the per-pixel logsumexp
// over classes and the CE sum.
template <typename T, typename L>
struct PixelInfo {
  std::vector<L> cls;
  std::vector<T> lse;  // softmax mode only
  double valid_count = 0.0;
  double ce_sum = 0.0;
};

template <typename logit_t, typename T, typename L>
PixelInfo<T, L> pixel_pass(const Problem& p, const logit_t* x, const Tensor& labels) {
  PixelInfo<T, L> info;
  const int64_t W = axis_x(p).size, image_rows = full_rows(p), S = full_plane(p);
  const int64_t rows = p.N * image_rows;
  info.cls.resize(p.N * S);
  if (p.mode == rmi::kSoftmaxMode) info.lse.resize(p.N * S);
  std::vector<double> row_count(rows, 0.0), row_ce(rows, 0.0);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "rmi_ext_labels", [&] {
    const auto* lab = labels.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> mx(W), sum(W);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / image_rows, r = row % image_rows;
        const scalar_t* lr = lab + n * p.ls[0] + row_offset(p, r, p.ls[1], p.ls[2]);
        L* cls = info.cls.data() + n * S + r * W;
        double count = 0.0;
        for (int64_t col = 0; col < W; ++col) {
          const int64_t label = static_cast<int64_t>(lr[col * p.ls[3]]);
          const bool valid = rmi::is_valid_label(label, p.C, p.ignore_index);
          cls[col] = valid ? static_cast<L>(label) : L(-1);
          count += valid ? 1.0 : 0.0;
        }
        row_count[row] = count;
        if (p.mode != rmi::kSoftmaxMode) continue;
        const logit_t* xr = x + n * p.xs[0] + row_offset(p, r, p.xs[2], p.xs[3]);
        T* lse = info.lse.data() + n * S + r * W;
        row_logsumexp(p, xr, mx, sum, lse);
        double ce = 0.0;
        for (int64_t col = 0; col < W; ++col)
          if (cls[col] >= 0) ce += lse[col] - static_cast<T>(xr[cls[col] * p.xs[1] + col * p.xs[4]]);
        row_ce[row] = ce;
      }
    });
  });
  for (int64_t row = 0; row < rows; ++row) {  // fixed order: the same sums for any thread count
    info.valid_count += row_count[row];
    info.ce_sum += row_ce[row];
  }
  return info;
}

// Float targets (RMI_SPEC.md section 6): per pixel of an image whether it counts (the mask, 1
// when there is none) and, in softmax mode, the logsumexp over classes and the sum over classes
// of the target (the soft CE's gradient is softmax * that sum - Y); the number of counted
// pixels and the soft CE sum -sum_c Y_c log_softmax(x)_c over them.
template <typename T>
struct FloatPixelInfo {
  std::vector<uint8_t> mask;  // [N, plane]
  std::vector<T> lse, y_sum;  // [N, plane], softmax mode only
  double valid_count = 0.0;
  double ce_sum = 0.0;
};

// Reads a float target [N, C, *spatial] (any float dtype, any strides) on the problem's three
// axes: value(n, c, r, col) of full-resolution row r of an image.
struct TargetView {
  const Tensor& t;
  int64_t sn, sc, sz, sy, sx;
  explicit TargetView(const Tensor& target)
      : t(target), sn(target.stride(0)), sc(target.stride(1)),
        sz(target.dim() == 4 ? 0 : target.stride(2)), sy(target.stride(target.dim() - 2)),
        sx(target.stride(target.dim() - 1)) {}
  // f(const value_t* row of (n, c), step) for the target's dtype value_t.
  template <typename F>
  void row(const Problem& p, int64_t n, int64_t c, int64_t r, F&& f) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "rmi_ext_target", [&] {
      f(t.const_data_ptr<scalar_t>() + n * sn + c * sc + row_offset(p, r, sz, sy), sx);
    });
  }
};

template <typename logit_t, typename T>
FloatPixelInfo<T> float_pixel_pass(const Problem& p, const logit_t* x, const Tensor& target,
                                   const c10::optional<Tensor>& mask) {
  FloatPixelInfo<T> info;
  const int64_t W = axis_x(p).size, image_rows = full_rows(p), S = full_plane(p);
  const int64_t rows = p.N * image_rows;
  const TargetView view(target);
  info.mask.assign(p.N * S, 1);
  if (mask.has_value()) {
    const Tensor& m = *mask;
    const bool* mp = m.const_data_ptr<bool>();
    const int64_t mz = m.dim() == 3 ? 0 : m.stride(1), my = m.stride(m.dim() - 2),
                  mx = m.stride(m.dim() - 1);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t n = row / image_rows, r = row % image_rows;
      const bool* mr = mp + n * m.stride(0) + row_offset(p, r, mz, my);
      for (int64_t col = 0; col < W; ++col) info.mask[n * S + r * W + col] = mr[col * mx] ? 1 : 0;
    }
  }
  if (p.mode == rmi::kSoftmaxMode) info.lse.resize(p.N * S), info.y_sum.resize(p.N * S);
  std::vector<double> row_count(rows, 0.0), row_ce(rows, 0.0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> mx(W), sum(W), ysum(W), yx(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / image_rows, r = row % image_rows;
      const uint8_t* valid = info.mask.data() + n * S + r * W;
      double count = 0.0;
      for (int64_t col = 0; col < W; ++col) count += valid[col];
      row_count[row] = count;
      if (p.mode != rmi::kSoftmaxMode) continue;
      const logit_t* xr = x + n * p.xs[0] + row_offset(p, r, p.xs[2], p.xs[3]);
      auto logit = [&](int64_t c, int64_t col) { return static_cast<T>(xr[c * p.xs[1] + col * p.xs[4]]); };
      T* lse = info.lse.data() + n * S + r * W;
      row_logsumexp(p, xr, mx, sum, lse);
      std::fill(ysum.begin(), ysum.end(), T(0));
      std::fill(yx.begin(), yx.end(), T(0));
      for (int64_t c = 0; c < p.C; ++c) {
        view.row(p, n, c, r, [&](const auto* yr, int64_t step) {
          for (int64_t col = 0; col < W; ++col) {
            const T y = static_cast<T>(yr[col * step]);
            ysum[col] += y, yx[col] += y * logit(c, col);
          }
        });
      }
      T* y_sum = info.y_sum.data() + n * S + r * W;
      double ce = 0.0;
      for (int64_t col = 0; col < W; ++col) {
        y_sum[col] = valid[col] ? ysum[col] : T(0);
        if (valid[col]) ce += ysum[col] * lse[col] - yx[col];  // -sum_c Y_c (x_c - lse)
      }
      row_ce[row] = ce;
    }
  });
  for (int64_t row = 0; row < rows; ++row) {  // fixed order: the same sums for any thread count
    info.valid_count += row_count[row];
    info.ce_sum += row_ce[row];
  }
  return info;
}

// What the kernels read of the target in one (n, c) plane at full resolution, from pixel u on:
// valid(u), Y(u), x * Y(u) (the BCE's cross term) and the sum over classes of Y (the softmax
// CE gradient's factor). ClassPlane: integer labels (the class map); FloatPlane: a float
// target's plane in the compute type, the mask and the per-pixel sums.
template <typename T, typename L>
struct ClassPlane {
  const L* cls;
  int32_t c;
  bool valid(int64_t u) const { return cls[u] >= 0; }
  T y(int64_t u) const { return cls[u] == c ? T(1) : T(0); }
  T x_times_y(int64_t u, T x) const { return cls[u] == c ? x : T(0); }
  T y_sum(int64_t) const { return T(1); }
  ClassPlane from(int64_t u) const { return {cls + u, c}; }
};

template <typename T>
struct FloatPlane {
  const T* ys;           // the target's plane (contiguous, the compute type)
  const uint8_t* mask;
  const T* sums;         // softmax mode: sum over classes of Y; else nullptr
  bool valid(int64_t u) const { return mask[u] != 0; }
  T y(int64_t u) const { return mask[u] ? ys[u] : T(0); }
  T x_times_y(int64_t u, T x) const { return x * y(u); }
  T y_sum(int64_t u) const { return sums[u]; }
  FloatPlane from(int64_t u) const { return {ys + u, mask + u, sums ? sums + u : nullptr}; }
};

// Whether the target's planes are contiguous planes of the compute type T (read in place).
template <typename T>
bool target_planes_direct(const Problem& p, const TargetView& view) {
  const int64_t W = axis_x(p).size;
  return view.t.scalar_type() == c10::CppTypeToScalarType<T>::value && view.sx == 1 &&
         view.sy == W && (axis_z(p).size == 1 || view.sz == axis_y(p).size * W);
}

// The plane (n, c) of a float target in the compute type: the target's own plane when it is a
// contiguous plane of T (nothing copied), else a copy in ys.
template <typename T>
const T* target_plane(const Problem& p, const TargetView& view, int64_t n, int64_t c,
                      std::vector<T>& ys) {
  const int64_t W = axis_x(p).size;
  if (target_planes_direct<T>(p, view))
    return view.t.const_data_ptr<T>() + n * view.sn + c * view.sc;
  ys.resize(full_plane(p));
  for (int64_t r = 0; r < full_rows(p); ++r)
    view.row(p, n, c, r, [&](const auto* yr, int64_t step) {
      for (int64_t col = 0; col < W; ++col) ys[r * W + col] = static_cast<T>(yr[col * step]);
    });
  return ys.data();
}

// ---- stage (a): one plane at full resolution, then pooled ---------------------------------

// Zeros before and after each pooled map: a flat loop over a block of rows reads up to R - 1
// (<= kMaxRadius - 1) elements past the block's first or last row.
constexpr int64_t kMapPad = rmi::kMaxRadius;

template <typename M>
double centre_map(M* map, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += map[i];
  const double mean = sum / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) map[i] = static_cast<M>(map[i] - mean);
  return mean;
}

// Scratch buffers of one thread, reused across its planes.
template <typename T>
struct PlaneScratch {
  // The sigmoid of one row at a time where the pooled maps are built row by row (no pooling,
  // average pooling: the backward recomputes each row's), else of the whole plane (max and
  // interp pooling read it at any pixel).
  static bool row_sigmoid(const Problem& p) { return !p.pools() || p.pool == rmi::kAvgPool; }
  std::vector<T> sig;            // [W] or [plane] the sigmoid (see row_sigmoid)
  // Pooled maps in the compute type: float keeps the per-thread scratch small at DF 1; every sum
  // over them is accumulated in float64.
  std::vector<T> yp, pp;         // [pad + pooled plane + pad] pooled Y and P, then centred; the
                                 // pads (zeros, kMapPad each side) let the moment and stencil
                                 // loops run over whole blocks of rows (see MomentGeometry)
  std::vector<T> grad_pp;        // [pooled plane] dloss/dP on the pooled map (backward), unless
                                 // the gradient's own plane holds it (see dp)
  T* dp = nullptr;               // where stage (d) puts dloss/dP of the current plane: grad_pp,
                                 // or without pooling the gradient's plane when it is a
                                 // contiguous plane of T (stage (e) then overwrites it row by row)
  std::vector<T> grad_full;      // [plane] dloss/dP at full resolution (backward, max/interp)
  std::vector<T> row_a, row_b;   // [W] one full-resolution row
  std::vector<T> rows_p, rows_y; // [pooled rows * W] average pooling: the sums over each pooled
                                 // row's window of rows; backward: rows_p holds the pooled
                                 // gradient spread over columns
  std::vector<int64_t> argmax;   // [pooled plane] max pooling: the index of each maximum
  std::vector<T> ys;             // [plane] a float target's plane copied (see target_plane)

  T* sig_of_row(const Problem& p, int64_t r) {
    return sig.data() + (row_sigmoid(p) ? 0 : r * axis_x(p).size);
  }
  T* y_map() { return yp.data() + kMapPad; }
  T* p_map() { return pp.data() + kMapPad; }
  // Subtracts the plane mean of each pooled map (covariances do not change; the raw-sum form
  // then cancels far less); returns the two means.
  std::pair<double, double> centre(int64_t n) { return {centre_map(y_map(), n), centre_map(p_map(), n)}; }

  // Elements of each buffer for one pass (0: unused): what resize() allocates, bytes() counts.
  struct Sizes {
    int64_t sig, map, row, rows, argmax, grad_pp, grad_full;
  };
  static Sizes sizes(const Problem& p, bool backward, bool dp_in_gradient) {
    const int64_t W = axis_x(p).size, pooled = pooled_plane(p), full = full_plane(p);
    const bool avg = p.pools() && p.pool == rmi::kAvgPool;
    const bool max = p.pools() && p.pool == rmi::kMaxPool;
    return {row_sigmoid(p) ? W : full, pooled + 2 * kMapPad, W, avg ? pooled_rows(p) * W : 0,
            max ? pooled : 0, backward && !dp_in_gradient ? pooled : 0,
            backward && p.pools() && !avg ? full : 0};
  }

  // Bytes of one thread's buffers for a pass, plus the copy of a float target's plane
  // (target_plane's ys) when copies_target; for plane_grain.
  static int64_t bytes(const Problem& p, bool backward, bool dp_in_gradient, bool copies_target) {
    const Sizes n = sizes(p, backward, dp_in_gradient);
    const int64_t elems = n.sig + 2 * n.map + 2 * n.row + 2 * n.rows + n.grad_pp + n.grad_full +
                          (copies_target ? full_plane(p) : 0);
    return elems * static_cast<int64_t>(sizeof(T)) +
           n.argmax * static_cast<int64_t>(sizeof(int64_t));
  }

  void resize(const Problem& p, bool backward, bool dp_in_gradient = false) {
    const Sizes n = sizes(p, backward, dp_in_gradient);
    sig.resize(n.sig), yp.assign(n.map, T(0)), pp.assign(n.map, T(0));
    row_a.resize(n.row), row_b.resize(n.row);
    rows_p.resize(n.rows), rows_y.resize(n.rows);
    argmax.resize(n.argmax);
    grad_pp.resize(n.grad_pp), grad_full.resize(n.grad_full);
    if (n.grad_pp > 0) dp = grad_pp.data();
  }
};

// What a row pass computes besides the sigmoid: the backward needs nothing else; the forward
// counts non-finite logits and, in sigmoid mode only, adds the masked BCE (softmax mode takes
// its CE from the pixel pre-pass).
enum class RowExtras { kNone, kNonFinite, kNonFiniteAndBce };

// Sigmoid of one row into sig[], plus the RowExtras: the row's BCE added to *bce, the number of
// non-finite logits to *bad. kStep: 1 for rows with unit stride (the loop then vectorises), 0
// for any other stride `step`.
template <int kStep, RowExtras kExtras, typename scalar_t, typename T, typename Lab>
void sigmoid_row(const scalar_t* xr, int64_t step, int64_t W, const Lab& lab, T* sig,
                 double* bce, int64_t* bad) {
  step = kStep == 1 ? 1 : step;
  T row_bce = T(0), row_bad = T(0);
#pragma omp simd reduction(+ : row_bce, row_bad)
  for (int64_t col = 0; col < W; ++col) {
    const T x = static_cast<T>(xr[col * step]);
    if constexpr (kExtras != RowExtras::kNone) row_bad += (x - x == T(0)) ? T(0) : T(1);  // NaN/Inf
    const T e = exp_nonpos(-std::fabs(x));
    const T inv = T(1) / (T(1) + e);
    sig[col] = x >= T(0) ? inv : e * inv;
    if constexpr (kExtras == RowExtras::kNonFiniteAndBce) {
      const T loss = (x > T(0) ? x : T(0)) - lab.x_times_y(col, x) + log1p_unit(e);
      row_bce += lab.valid(col) ? loss : T(0);
    }
  }
  *bce += static_cast<double>(row_bce);
  *bad += static_cast<int64_t>(row_bad);
}

// Region mode (region_mi): the map's values themselves into sig[], non-finite ones counted.
template <RowExtras kExtras, typename scalar_t, typename T>
void value_row(const scalar_t* xr, int64_t step, int64_t W, T* sig, int64_t* bad) {
  T row_bad = T(0);
  for (int64_t col = 0; col < W; ++col) {
    const T x = static_cast<T>(xr[col * step]);
    if constexpr (kExtras != RowExtras::kNone) row_bad += (x - x == T(0)) ? T(0) : T(1);
    sig[col] = x;
  }
  *bad += static_cast<int64_t>(row_bad);
}

// Sigmoid of full-resolution row r of a plane into sig[] (sigmoid_row, either stride; the
// values themselves in region mode).
template <RowExtras kExtras, typename scalar_t, typename T, typename Lab>
void sigmoid_row_of(const Problem& p, const scalar_t* xp, int64_t r, const Lab& lab, T* sig,
                    double* bce, int64_t* bad) {
  const int64_t W = axis_x(p).size;
  const scalar_t* xr = xp + row_offset(p, r, p.xs[2], p.xs[3]);
  if (p.mode == rmi::kRegionMode)
    value_row<kExtras>(xr, p.xs[4], W, sig, bad);
  else if (p.xs[4] == 1)
    sigmoid_row<1, kExtras>(xr, 1, W, lab.from(r * W), sig, bce, bad);
  else
    sigmoid_row<0, kExtras>(xr, p.xs[4], W, lab.from(r * W), sig, bce, bad);
}

template <typename T, typename Lab>
void add_pooled_row(const Problem& p, int64_t r, const T* sig, const Lab& lab, PlaneScratch<T>& s);

// The full-resolution pass of stage (a): the sigmoid of every row of one plane into s.sig
// (PlaneScratch::row_sigmoid: each row then goes into the pooled maps at once, add_pooled_row;
// pooled_maps_plane does the rest). With a non-null `nonfinite` (forward) also counts the
// non-finite logits into it and returns the plane's BCE sum in sigmoid mode (0 otherwise).
template <typename scalar_t, typename T, typename Lab>
double first_term_plane(const Problem& p, const scalar_t* xp, const Lab& lab, PlaneScratch<T>& s,
                        int64_t* nonfinite) {
  double bce = 0.0;
  int64_t bad = 0;
  const bool by_row = PlaneScratch<T>::row_sigmoid(p);
  if (by_row && p.pools()) {  // average pooling: window sums of rows, filled row by row
    std::fill(s.rows_p.begin(), s.rows_p.end(), T(0));
    std::fill(s.rows_y.begin(), s.rows_y.end(), T(0));
  }
  auto rows = [&](auto extras) {
    for (int64_t r = 0; r < full_rows(p); ++r) {
      T* sig = s.sig_of_row(p, r);
      sigmoid_row_of<decltype(extras)::value>(p, xp, r, lab, sig, &bce, &bad);
      if (by_row) add_pooled_row(p, r, sig, lab.from(r * axis_x(p).size), s);
    }
  };
  if (nonfinite == nullptr)
    rows(std::integral_constant<RowExtras, RowExtras::kNone>{});
  else if (p.mode == rmi::kSigmoidMode)
    rows(std::integral_constant<RowExtras, RowExtras::kNonFiniteAndBce>{});
  else
    rows(std::integral_constant<RowExtras, RowExtras::kNonFinite>{});
  if (nonfinite) *nonfinite += bad;
  return bce;
}

// Pooled indices along axis `a` whose average-pool window holds input index u: [*lo, *hi]
// (empty when lo > hi).
inline void pooled_range(int64_t u, const rmi::Axis& a, int64_t* lo, int64_t* hi) {
  const int64_t pad = a.kernel / 2, below = u + pad - a.kernel;  // o > below / factor
  *lo = below < 0 ? 0 : below / a.factor + 1;
  *hi = std::min(a.pooled - 1, (u + pad) / a.factor);
}

// The pooled rows (oz * y' + oy) whose window holds full-resolution row r: oz in [z0, z1],
// oy in [y0, y1] (empty when a range is).
struct PooledRows {
  int64_t z0, z1, y0, y1;
  bool empty() const { return z0 > z1 || y0 > y1; }
};
inline PooledRows pooled_rows_of(int64_t r, const Problem& p) {
  PooledRows out;
  pooled_range(r / axis_y(p).size, axis_z(p), &out.z0, &out.z1);
  pooled_range(r % axis_y(p).size, axis_y(p), &out.y0, &out.y1);
  return out;
}

// P and Y of one full-resolution row of class c (vectorised).
template <typename T, typename Lab>
void prob_row(const Problem& p, const T* sig, const Lab& lab, T* prow, T* yrow) {
  const int64_t W = axis_x(p).size;
  // One loop per mode: a mode test inside the loop would stop it from vectorising.
  if (p.mode == rmi::kRegionMode) {
#pragma omp simd
    for (int64_t col = 0; col < W; ++col) {
      prow[col] = lab.valid(col) ? sig[col] : T(0);  // region_mi: P = the map times the mask
      yrow[col] = lab.y(col);
    }
  } else if (p.mode == rmi::kSigmoidMode) {
#pragma omp simd
    for (int64_t col = 0; col < W; ++col) {
      prow[col] = rmi::rmi_prob(sig[col], lab.valid(col), rmi::kSigmoidMode);
      yrow[col] = lab.y(col);
    }
  } else {
#pragma omp simd
    for (int64_t col = 0; col < W; ++col) {
      prow[col] = rmi::rmi_prob(sig[col], lab.valid(col), rmi::kSoftmaxMode);
      yrow[col] = lab.y(col);
    }
  }
}

// One full-resolution row's P and Y (sigmoid sig[], classes cls[] of the row) into the pooled
// maps: the maps' row itself without pooling, the window sums of rows s.rows_p / s.rows_y with
// average pooling (PlaneScratch::row_sigmoid).
template <typename T, typename Lab>
void add_pooled_row(const Problem& p, int64_t r, const T* sig, const Lab& lab, PlaneScratch<T>& s) {
  const int64_t W = axis_x(p).size;
  if (!p.pools()) {  // the pooled maps are the full-resolution ones
    prob_row(p, sig, lab, s.p_map() + r * W, s.y_map() + r * W);
    return;
  }
  const PooledRows to = pooled_rows_of(r, p);
  if (to.empty()) return;
  T* prow = s.row_a.data();
  T* yrow = s.row_b.data();
  prob_row(p, sig, lab, prow, yrow);
  for (int64_t oz = to.z0; oz <= to.z1; ++oz)
    for (int64_t oy = to.y0; oy <= to.y1; ++oy) {
      T* ap = s.rows_p.data() + (oz * axis_y(p).pooled + oy) * W;
      T* ay = s.rows_y.data() + (oz * axis_y(p).pooled + oy) * W;
#pragma omp simd
      for (int64_t col = 0; col < W; ++col) ap[col] += prow[col], ay[col] += yrow[col];
    }
}

// Pooled Y and P of one plane into s.y_map(), s.p_map(), after first_term_plane: average
// pooling sums the columns of its row sums; max and interp pooling read s.sig and the class map.
template <typename T, typename Lab>
void pooled_maps_plane(const Problem& p, const Lab& lab, PlaneScratch<T>& s) {
  const T* sig = s.sig.data();
  auto prob = [&](int64_t u) {
    if (p.mode == rmi::kRegionMode) return lab.valid(u) ? sig[u] : T(0);  // the map times the mask
    return rmi::rmi_prob(sig[u], lab.valid(u), p.mode);
  };
  const rmi::Axis &Z = axis_z(p), &Y = axis_y(p), &X = axis_x(p);
  const int64_t W = X.size, w = X.pooled;
  T* ymap = s.y_map();
  T* pmap = s.p_map();
  if (!p.pools()) return;  // first_term_plane wrote the maps
  if (p.pool == rmi::kAvgPool) {  // the window sums of rows (first_term_plane), then columns
    const double inv_area = 1.0 / static_cast<double>(Z.kernel * Y.kernel * X.kernel);
    for (int64_t orow = 0; orow < pooled_rows(p); ++orow) {
      const T* ap = s.rows_p.data() + orow * W;
      const T* ay = s.rows_y.data() + orow * W;
      for (int64_t ox = 0; ox < w; ++ox) {
        int64_t x0, x1;
        rmi::pool_window(ox, W, X.kernel, X.factor, &x0, &x1);
        T sp = T(0), sy = T(0);
        for (int64_t xx = x0; xx < x1; ++xx) sp += ap[xx], sy += ay[xx];
        pmap[orow * w + ox] = static_cast<T>(static_cast<double>(sp) * inv_area);
        ymap[orow * w + ox] = static_cast<T>(static_cast<double>(sy) * inv_area);
      }
    }
    return;
  }
  if (p.pool == rmi::kInterp) {  // P bilinear / trilinear (align_corners=True), Y nearest
    for (int64_t oz = 0; oz < Z.pooled; ++oz) {
      const auto tz = rmi::linear_tap<T>(oz, Z.size, Z.pooled);
      const int64_t src_z = rmi::nearest_source(oz, Z.size, Z.pooled);
      for (int64_t oy = 0; oy < Y.pooled; ++oy) {
        const auto ty = rmi::linear_tap<T>(oy, Y.size, Y.pooled);
        const int64_t src_row = (src_z * Y.size + rmi::nearest_source(oy, Y.size, Y.pooled)) * W;
        const int64_t orow = oz * Y.pooled + oy;
        for (int64_t ox = 0; ox < w; ++ox) {
          const auto tx = rmi::linear_tap<T>(ox, W, w);
          auto bilinear = [&](int64_t z) {  // the (y, x) taps in slice z
            const int64_t r0 = (z * Y.size + ty.i0) * W, r1 = (z * Y.size + ty.i1) * W;
            const T top = tx.w0 * prob(r0 + tx.i0) + tx.w1 * prob(r0 + tx.i1);
            const T bottom = tx.w0 * prob(r1 + tx.i0) + tx.w1 * prob(r1 + tx.i1);
            return ty.w0 * top + ty.w1 * bottom;
          };
          const T front = bilinear(tz.i0);
          pmap[orow * w + ox] = tz.w1 == T(0) ? front : tz.w0 * front + tz.w1 * bilinear(tz.i1);
          ymap[orow * w + ox] = lab.y(src_row + rmi::nearest_source(ox, W, w));
        }
      }
    }
    return;
  }
  // Max pooling (-inf padding): P the window maximum, Y the window maximum of Y (integer labels:
  // whether any window pixel is class c);
  // s.argmax keeps where the maximum is (the first in row-major window order, as max_pool2d /
  // max_pool3d pick it) for the backward's pooling adjoint.
  for (int64_t oz = 0; oz < Z.pooled; ++oz) {
    int64_t z0, z1;
    rmi::pool_window(oz, Z.size, Z.kernel, Z.factor, &z0, &z1);
    for (int64_t oy = 0; oy < Y.pooled; ++oy) {
      int64_t y0, y1;
      rmi::pool_window(oy, Y.size, Y.kernel, Y.factor, &y0, &y1);
      const int64_t orow = oz * Y.pooled + oy;
      for (int64_t ox = 0; ox < w; ++ox) {
        int64_t x0, x1;
        rmi::pool_window(ox, W, X.kernel, X.factor, &x0, &x1);
        T best = -std::numeric_limits<T>::infinity();
        int64_t arg = (z0 * Y.size + y0) * W + x0;
        T ymax = -std::numeric_limits<T>::infinity();
        for (int64_t zz = z0; zz < z1; ++zz)
          for (int64_t yy = y0; yy < y1; ++yy)
            for (int64_t xx = x0; xx < x1; ++xx) {
              const int64_t u = (zz * Y.size + yy) * W + xx;
              const T v = prob(u);
              if (v > best) best = v, arg = u;
              ymax = std::max(ymax, lab.y(u));
            }
        pmap[orow * w + ox] = best;
        ymap[orow * w + ox] = ymax;
        s.argmax[orow * w + ox] = arg;
      }
    }
  }
}

// ---- segments: pixels of one axis that admit the same region offsets -----------------------

struct Segments {
  std::vector<int64_t> begin, end;  // pixel range of segment s
  std::vector<int64_t> lo, hi;      // offsets o (along this axis) valid for its pixels
  std::vector<int64_t> first, last; // segments whose pixels admit offset o: [first[o], last[o]]
  int64_t count() const { return static_cast<int64_t>(begin.size()); }
};

// Axis of length n with n - R + 1 window positions: pixel u admits offset o iff 0 <= u - o < n-R+1.
Segments make_segments(int64_t n, int64_t R) {
  Segments seg;
  const int64_t windows = n - R + 1;
  for (int64_t u = 0; u < n; ++u) {
    const int64_t lo = std::max<int64_t>(0, u - (windows - 1)), hi = std::min<int64_t>(R - 1, u);
    if (!seg.begin.empty() && seg.lo.back() == lo && seg.hi.back() == hi) {
      seg.end.back() = u + 1;
    } else {
      seg.begin.push_back(u), seg.end.push_back(u + 1), seg.lo.push_back(lo), seg.hi.push_back(hi);
    }
  }
  seg.first.assign(R, seg.count()), seg.last.assign(R, -1);
  for (int64_t s = 0; s < seg.count(); ++s)
    for (int64_t o = seg.lo[s]; o <= seg.hi[s]; ++o) {
      seg.first[o] = std::min(seg.first[o], s);
      seg.last[o] = std::max(seg.last[o], s);
    }
  return seg;
}

// Lags l = (ez, ey, ex), each in [-(R-1), R-1] for its axis' region side R, numbered row-major.
struct Lags {
  int64_t count;
  std::vector<int64_t> ez, ey, ex;  // of lag l
  // The "upper" lags, one of each pair l, -l: l >= 0 in raster order, i.e. the numbers from the
  // zero lag's (count / 2, the middle: the sides are odd) to count - 1.
  int64_t first_upper;
  int64_t side[3];                  // 2R - 1 per axis
  explicit Lags(const int64_t radius[3]) {
    for (int i = 0; i < 3; ++i) side[i] = 2 * radius[i] - 1;
    count = side[0] * side[1] * side[2];
    first_upper = count / 2;
    for (int64_t l = 0; l < count; ++l) {
      ez.push_back(l / (side[1] * side[2]) - (radius[0] - 1));
      ey.push_back(l / side[2] % side[1] - (radius[1] - 1));
      ex.push_back(l % side[2] - (radius[2] - 1));
    }
  }
  int64_t index(int64_t dz, int64_t dy, int64_t dx) const {
    return ((dz + side[0] / 2) * side[1] + (dy + side[1] / 2)) * side[2] + (dx + side[2] / 2);
  }
};

// ---- stage (b): moments --------------------------------------------------------------------

// Segments of the pooled maps on each axis, the lags, and the region offsets: offset i =
// (iz * Ry + iy) * Rx + ix, row-major as in the reference.
struct MomentGeometry {
  Segments sz, sy, sx;
  int64_t radius[3];
  int64_t hz, hy, w;  // pooled map lengths along z, y, x
  Lags lags;
  // The x segment whose pixels admit every offset (the interior columns), or -1 on maps too
  // narrow for one; the other x segments are border columns, R - 1 on each side.
  int64_t inner;
  // The columns of the other x segments, and each one's segment.
  std::vector<int64_t> border_col, border_seg;
  explicit MomentGeometry(const Problem& p)
      : sz(make_segments(p.axis[0].pooled, p.axis[0].radius)),
        sy(make_segments(p.axis[1].pooled, p.axis[1].radius)),
        sx(make_segments(p.axis[2].pooled, p.axis[2].radius)),
        radius{p.axis[0].radius, p.axis[1].radius, p.axis[2].radius},
        hz(p.axis[0].pooled), hy(p.axis[1].pooled), w(p.axis[2].pooled),
        lags(radius), inner(-1) {
    for (int64_t c = 0; c < sx.count() && inner < 0; ++c)
      if (sx.lo[c] == 0 && sx.hi[c] == radius[2] - 1 && sx.end[c] - sx.begin[c] > 1) inner = c;
    for (int64_t c = 0; c < sx.count(); ++c)
      for (int64_t col = sx.begin[c]; col < sx.end[c] && c != inner; ++col)
        border_col.push_back(col), border_seg.push_back(c);
  }
  int64_t cells() const { return sz.count() * sy.count() * sx.count(); }
  int64_t cell(int64_t a, int64_t b, int64_t c) const { return (a * sy.count() + b) * sx.count() + c; }
  int64_t oz(int64_t i) const { return i / (radius[1] * radius[2]); }
  int64_t oy(int64_t i) const { return i / radius[2] % radius[1]; }
  int64_t ox(int64_t i) const { return i % radius[2]; }
  // Sum of table[cell] over the cells whose pixels admit offset i.
  double rect(const double* table, int64_t i) const {
    double sum = 0.0;
    for (int64_t a = sz.first[oz(i)]; a <= sz.last[oz(i)]; ++a)
      for (int64_t b = sy.first[oy(i)]; b <= sy.last[oy(i)]; ++b)
        for (int64_t c = sx.first[ox(i)]; c <= sx.last[ox(i)]; ++c) sum += table[cell(a, b, c)];
    return sum;
  }
  // Calls f(uz, uy0, rows, first row, cell of x segment 0) for every block of pooled rows: the
  // rows uy0 .. uy0 + rows - 1 of one y segment at depth uz, contiguous in the pooled plane. For
  // a block of several rows (an interior segment) every lag's rows are inside the plane.
  template <typename F>
  void for_each_block(F&& f) const {
    for (int64_t a = 0; a < sz.count(); ++a)
      for (int64_t b = 0; b < sy.count(); ++b)
        for (int64_t uz = sz.begin[a]; uz < sz.end[a]; ++uz)
          f(uz, sy.begin[b], sy.end[b] - sy.begin[b], uz * hy + sy.begin[b], cell(a, b, 0));
  }
  // Whether the rows of the block (uz, uy0 .. uy0 + rows - 1) shifted by lag l are in the plane.
  bool lag_fits(int64_t uz, int64_t uy0, int64_t rows, int64_t l) const {
    const int64_t vz = uz + lags.ez[l], vy = uy0 + lags.ey[l];
    return vz >= 0 && vz < hz && vy >= 0 && vy + rows <= hy;
  }
  // Offset of lag l in the flat pooled plane.
  int64_t lag_offset(int64_t l) const { return (lags.ez[l] * hy + lags.ey[l]) * w + lags.ex[l]; }
};

// The four product sums of one upper lag l (the other lags are these with the maps' roles
// swapped: sum_u Y[u] P[u - l] = sum_v P[v] Y[v + l]).
struct LagSums {
  double yp, yy, pp, py;  // sums of Y(u) P(u + l), Y(u) Y(u + l), P(u) P(u + l), P(u) Y(u + l)
};

// LagSums over a flat run of n elements (a: Y, pa: P of the block; y1, p1: the maps at the
// lag), in float64 (the loop vectorises; float products are exact in float64).
template <typename M>
LagSums lag_products(const M* a, const M* pa, const M* y1, const M* p1, int64_t n) {
  double yp = 0.0, yy = 0.0, pp = 0.0, py = 0.0;
#pragma omp simd reduction(+ : yp, yy, pp, py)
  for (int64_t q = 0; q < n; ++q) {
    const double ya = a[q], pa_ = pa[q], yb = y1[q], pb = p1[q];
    yp += ya * pb;
    yy += ya * yb;
    pp += pa_ * pb;
    py += pa_ * yb;
  }
  return {yp, yy, pp, py};
}

// The same sums down the border columns `cols[k]` of `rows` rows w apart, one LagSums per
// column into f[k], row by row: the border columns of a row share its cache lines (one column
// at a time touched every line once per column).
template <typename M>
void border_lag_products(const M* a, const M* pa, const M* y1, const M* p1, int64_t rows,
                         int64_t w, const std::vector<int64_t>& cols, LagSums* f) {
  const int64_t nb = static_cast<int64_t>(cols.size());
  std::fill(f, f + nb, LagSums{0.0, 0.0, 0.0, 0.0});
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = i * w;
    for (int64_t k = 0; k < nb; ++k) {
      const int64_t q = r + cols[k];
      const double ya = a[q], pa_ = pa[q], yb = y1[q], pb = p1[q];
      f[k].yp += ya * pb, f[k].yy += ya * yb, f[k].pp += pa_ * pb, f[k].py += pa_ * yb;
    }
  }
}

// means [2, d] (mu_y, mu_p) and cov [3, d, d] (Sy, Sp, B) of one plane from centred yp, pp.
// Only the upper lags are summed (LagSums): B's entries of a lower lag are P.Y sums of the
// opposite upper lag, over the cells of the other offset.
template <typename M>
void moment_sums_plane(const Problem& p, const MomentGeometry& g, const M* yc, const M* pc,
                   double y_shift, double p_shift, double* means, double* cov,
                   std::vector<double>& tables) {
  const int64_t cells = g.cells(), L = g.lags.count, l0 = g.lags.first_upper;
  const int64_t w = g.w, inner = g.inner;
  // tables: [L - l0][cells] for Y.P, Y.Y, P.P, P.Y (upper lag l at l - l0), then [cells] sums
  // of Y and P.
  const int64_t n_upper = (L - l0) * cells;
  tables.assign(4 * n_upper + 2 * cells, 0.0);
  double* t_yp = tables.data();
  double* t_yy = t_yp + n_upper;
  double* t_pp = t_yy + n_upper;
  double* t_py = t_pp + n_upper;
  double* t_y = t_py + n_upper;
  double* t_p = t_y + cells;
  auto at = [&](int64_t l) { return (l - l0) * cells; };  // upper lag l's row in the tables
  const int64_t nb = static_cast<int64_t>(g.border_col.size());
  std::vector<LagSums> border_sums(nb);  // one lag's sums down each border column
  auto add = [&](int64_t l, int64_t cell, const LagSums& s) {
    const int64_t q = at(l) + cell;
    t_yp[q] += s.yp, t_yy[q] += s.yy, t_pp[q] += s.pp, t_py[q] += s.py;
  };
  g.for_each_block([&](int64_t uz, int64_t uy0, int64_t rows, int64_t row0, int64_t cell0) {
    const M* yb = yc + row0 * w;
    const M* pb = pc + row0 * w;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t b = 0; b < g.sx.count(); ++b) {
        double sy = 0.0, sp = 0.0;
        for (int64_t col = g.sx.begin[b]; col < g.sx.end[b]; ++col)
          sy += yb[i * w + col], sp += pb[i * w + col];
        t_y[cell0 + b] += sy, t_p[cell0 + b] += sp;
      }
    for (int64_t l = l0; l < L; ++l) {
      if (!g.lag_fits(uz, uy0, rows, l)) continue;
      const int64_t ex = g.lags.ex[l];
      const M* y1 = yb + g.lag_offset(l);
      const M* p1 = pb + g.lag_offset(l);
      // Every column of the block in flat loops (the inner x segment's sums) ...
      LagSums s{0.0, 0.0, 0.0, 0.0};
      if (inner >= 0) s = lag_products(yb, pb, y1, p1, rows * w);
      // ... then the border columns (down the block's rows): taken out of those sums and,
      // where u + l is inside the plane, put in their own cells.
      border_lag_products(yb, pb, y1, p1, rows, w, g.border_col, border_sums.data());
      for (int64_t k = 0; k < nb; ++k) {
        const LagSums& f = border_sums[k];
        if (inner >= 0) s.yp -= f.yp, s.yy -= f.yy, s.pp -= f.pp, s.py -= f.py;
        const int64_t col = g.border_col[k];
        if (col + ex >= 0 && col + ex < w) add(l, cell0 + g.border_seg[k], f);  // u + l inside
      }
      if (inner >= 0) add(l, cell0 + inner, s);
    }
  });
  const int64_t d = p.d;
  double K = 1.0;
  for (int i = 0; i < 3; ++i) K *= static_cast<double>(p.axis[i].pooled - p.axis[i].radius + 1);
  std::vector<double> mu_y(d), mu_p(d);  // means of the centred maps
  for (int64_t i = 0; i < d; ++i) {
    mu_y[i] = g.rect(t_y, i) / K;
    mu_p[i] = g.rect(t_p, i) / K;
    means[i] = mu_y[i] + y_shift;
    means[d + i] = mu_p[i] + p_shift;
  }
  double* s_y = cov;
  double* s_p = cov + d * d;
  double* s_b = cov + 2 * d * d;
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < d; ++j) {
      const int64_t l = g.lags.index(g.oz(j) - g.oz(i), g.oy(j) - g.oy(i), g.ox(j) - g.ox(i));
      if (l < l0) {  // B[i][j] = sum over k of P(k + o_j) Y(k + o_j + (o_i - o_j))
        const int64_t m = g.lags.index(g.oz(i) - g.oz(j), g.oy(i) - g.oy(j), g.ox(i) - g.ox(j));
        s_b[i * d + j] = g.rect(t_py + at(m), j) - K * mu_y[i] * mu_p[j];
        continue;
      }
      s_b[i * d + j] = g.rect(t_yp + at(l), i) - K * mu_y[i] * mu_p[j];
      const double vy = g.rect(t_yy + at(l), i) - K * mu_y[i] * mu_y[j];
      const double vp = g.rect(t_pp + at(l), i) - K * mu_p[i] * mu_p[j];
      s_y[i * d + j] = s_y[j * d + i] = vy;
      s_p[i * d + j] = s_p[j * d + i] = vp;
    }
  }
}

// ---- stage (d): pooled-map stencil ---------------------------------------------------------

// Inclusive prefix sums of a function on the region offsets (iz, iy, ix), and its sums over
// boxes of offsets.
struct OffsetPrefix {
  int64_t r[3];
  std::vector<double> v;  // [(Rz+1) (Ry+1) (Rx+1)], v[(a, b, c)] = sum over offsets < (a, b, c)
  explicit OffsetPrefix(const int64_t radius[3])
      : r{radius[0], radius[1], radius[2]}, v((r[0] + 1) * (r[1] + 1) * (r[2] + 1), 0.0) {}
  double& at(int64_t a, int64_t b, int64_t c) { return v[(a * (r[1] + 1) + b) * (r[2] + 1) + c]; }
  template <typename F>
  void build(F&& value) {
    for (int64_t a = 0; a < r[0]; ++a)
      for (int64_t b = 0; b < r[1]; ++b)
        for (int64_t c = 0; c < r[2]; ++c)
          at(a + 1, b + 1, c + 1) = value(a, b, c) + at(a, b + 1, c + 1) + at(a + 1, b, c + 1) +
                                    at(a + 1, b + 1, c) - at(a, b, c + 1) - at(a, b + 1, c) -
                                    at(a + 1, b, c) + at(a, b, c);
  }
  // Sum over offsets [z0, z1) x [y0, y1) x [x0, x1).
  double box(int64_t z0, int64_t z1, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
    return at(z1, y1, x1) - at(z0, y1, x1) - at(z1, y0, x1) - at(z1, y1, x0) + at(z0, y0, x1) +
           at(z0, y1, x0) + at(z1, y0, x0) - at(z0, y0, x0);
  }
};

// dloss/dP on the pooled map: window k gets g_k = Cp p_k + Cy y_k + c, entry i lands on k + o_i.
// In lag form, dP[u] = const(cell) + sum_l Kp_l(cell) P[u + l] + Ky_l(cell) Y[u + l].
template <typename M>
void pooled_grad_stencil_plane(const Problem& p, const MomentGeometry& g, const M* yc, const M* pc,
                   double y_shift, double p_shift, const double* cp, const double* cy,
                   const double* shift, M* out, std::vector<double>& tables) {
  const int64_t d = p.d, L = g.lags.count, cells = g.cells(), nsx = g.sx.count();
  const int64_t w = g.w, inner = g.inner;
  const int64_t* R = g.radius;
  tables.assign(2 * L * cells + cells, 0.0);
  double* k_p = tables.data();
  double* k_y = k_p + L * cells;
  double* k_c = k_y + L * cells;
  OffsetPrefix pre_p(R), pre_y(R), pre_c(R);
  // Sum of a prefix table over the offsets that the pixels of cell (a, b, c) admit.
  auto box = [&](OffsetPrefix& pre, int64_t a, int64_t b, int64_t c) {
    return pre.box(g.sz.lo[a], g.sz.hi[a] + 1, g.sy.lo[b], g.sy.hi[b] + 1, g.sx.lo[c],
                   g.sx.hi[c] + 1);
  };
  auto for_each_cell = [&](auto&& f) {
    for (int64_t a = 0; a < g.sz.count(); ++a)
      for (int64_t b = 0; b < g.sy.count(); ++b)
        for (int64_t c = 0; c < nsx; ++c) f(a, b, c, g.cell(a, b, c));
  };
  pre_c.build([&](int64_t iz, int64_t iy, int64_t ix) { return shift[(iz * R[1] + iy) * R[2] + ix]; });
  for_each_cell([&](int64_t a, int64_t b, int64_t c, int64_t cell) { k_c[cell] = box(pre_c, a, b, c); });
  for (int64_t l = 0; l < L; ++l) {
    const int64_t ez = g.lags.ez[l], ey = g.lags.ey[l], ex = g.lags.ex[l];
    auto coef = [&](const double* m) {
      return [=](int64_t iz, int64_t iy, int64_t ix) {
        const int64_t jz = iz + ez, jy = iy + ey, jx = ix + ex;
        if (jz < 0 || jz >= R[0] || jy < 0 || jy >= R[1] || jx < 0 || jx >= R[2]) return 0.0;
        return m[((iz * R[1] + iy) * R[2] + ix) * d + (jz * R[1] + jy) * R[2] + jx];
      };
    };
    pre_p.build(coef(cp));
    pre_y.build(coef(cy));
    for_each_cell([&](int64_t a, int64_t b, int64_t c, int64_t cell) {
      const double vp = box(pre_p, a, b, c), vy = box(pre_y, a, b, c);
      k_p[l * cells + cell] = vp;
      k_y[l * cells + cell] = vy;
      k_c[cell] += vp * p_shift + vy * y_shift;  // the maps are centred
    });
  }
  g.for_each_block([&](int64_t uz, int64_t uy0, int64_t rows, int64_t row0, int64_t cell0) {
    M* ob = out + row0 * w;
    const M* yb = yc + row0 * w;
    const M* pb = pc + row0 * w;
    // Every column of the block with the inner x segment's coefficients, in flat loops ...
    if (inner >= 0) {
      const M kc = static_cast<M>(k_c[cell0 + inner]);
      std::fill(ob, ob + rows * w, kc);
      for (int64_t l = 0; l < L; ++l) {
        const M kp = static_cast<M>(k_p[l * cells + cell0 + inner]);
        const M ky = static_cast<M>(k_y[l * cells + cell0 + inner]);
        if ((kp == M(0) && ky == M(0)) || !g.lag_fits(uz, uy0, rows, l)) continue;
        const M* y1 = yb + g.lag_offset(l);
        const M* p1 = pb + g.lag_offset(l);
#pragma omp simd
        for (int64_t q = 0; q < rows * w; ++q) ob[q] += kp * p1[q] + ky * y1[q];
      }
    }
    // ... then the border columns again (down the block's rows), each with its own cell's
    // coefficients.
    for (int64_t b = 0; b < nsx; ++b) {
      if (b == inner) continue;
      for (int64_t col = g.sx.begin[b]; col < g.sx.end[b]; ++col) {
        M* oc = ob + col;
        const M kc = static_cast<M>(k_c[cell0 + b]);
        for (int64_t i = 0; i < rows; ++i) oc[i * w] = kc;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t ex = g.lags.ex[l];
          if (col + ex < 0 || col + ex >= w || !g.lag_fits(uz, uy0, rows, l)) continue;
          const M kp = static_cast<M>(k_p[l * cells + cell0 + b]);
          const M ky = static_cast<M>(k_y[l * cells + cell0 + b]);
          const M* p1 = pb + col + g.lag_offset(l);
          const M* y1 = yb + col + g.lag_offset(l);
          for (int64_t i = 0; i < rows; ++i) oc[i * w] += kp * p1[i * w] + ky * y1[i * w];
        }
      }
    }
  });
}

// ---- stage (e): pooling adjoint and the full-resolution gradient ---------------------------

// dloss/dP at full resolution from the pooled-map gradient s.dp, into s.grad_full
// (max and interp; average pooling is spread row by row in grad_prob_row).
template <typename T>
void pool_adjoint_plane(const Problem& p, PlaneScratch<T>& s) {
  std::fill(s.grad_full.begin(), s.grad_full.end(), T(0));
  T* out = s.grad_full.data();
  const rmi::Axis &Z = axis_z(p), &Y = axis_y(p), &X = axis_x(p);
  const int64_t W = X.size, w = X.pooled;
  for (int64_t oz = 0; oz < Z.pooled; ++oz) {
    for (int64_t oy = 0; oy < Y.pooled; ++oy) {
      const int64_t orow = oz * Y.pooled + oy;
      for (int64_t ox = 0; ox < w; ++ox) {
        const double gpool = s.dp[orow * w + ox];
        if (p.pool == rmi::kMaxPool) {  // where pooled_maps_plane found the maximum
          out[s.argmax[orow * w + ox]] += static_cast<T>(gpool);
          continue;
        }
        const auto tz = rmi::linear_tap<T>(oz, Z.size, Z.pooled);
        const auto ty = rmi::linear_tap<T>(oy, Y.size, Y.pooled);
        const auto tx = rmi::linear_tap<T>(ox, W, w);
        const T gv = static_cast<T>(gpool);
        auto spread = [&](int64_t z, T gz) {  // the (y, x) taps in slice z
          const int64_t r0 = (z * Y.size + ty.i0) * W, r1 = (z * Y.size + ty.i1) * W;
          out[r0 + tx.i0] += ty.w0 * tx.w0 * gz;
          out[r0 + tx.i1] += ty.w0 * tx.w1 * gz;
          out[r1 + tx.i0] += ty.w1 * tx.w0 * gz;
          out[r1 + tx.i1] += ty.w1 * tx.w1 * gz;
        };
        if (tz.w1 == T(0)) {
          spread(tz.i0, gv);
        } else {
          spread(tz.i0, tz.w0 * gv);
          spread(tz.i1, tz.w1 * gv);
        }
      }
    }
  }
}

// Average pooling adjoint, columns: s.rows_p[orow][col] = sum over ox covering col of
// dp[orow][ox] / (kernel volume) (the rows are added per full-resolution row in
// grad_prob_row).
template <typename T>
void spread_pooled_columns(const Problem& p, PlaneScratch<T>& s) {
  std::fill(s.rows_p.begin(), s.rows_p.end(), T(0));
  const rmi::Axis& X = axis_x(p);
  const double inv_area =
      1.0 / static_cast<double>(axis_z(p).kernel * axis_y(p).kernel * X.kernel);
  for (int64_t orow = 0; orow < pooled_rows(p); ++orow) {
    T* row = s.rows_p.data() + orow * X.size;
    for (int64_t ox = 0; ox < X.pooled; ++ox) {
      const T v = static_cast<T>(s.dp[orow * X.pooled + ox] * inv_area);
      int64_t x0, x1;
      rmi::pool_window(ox, X.size, X.kernel, X.factor, &x0, &x1);
      for (int64_t xx = x0; xx < x1; ++xx) row[xx] += v;
    }
  }
}

// dloss/dP of full-resolution row r into grow[], from the pooled-map gradient.
template <typename T>
void grad_prob_row(const Problem& p, int64_t r, PlaneScratch<T>& s, T* grow) {
  const int64_t W = axis_x(p).size;
  if (!p.pools()) {
    std::copy(s.dp + r * W, s.dp + (r + 1) * W, grow);
    return;
  }
  if (p.pool != rmi::kAvgPool) {
    std::copy(s.grad_full.begin() + r * W, s.grad_full.begin() + (r + 1) * W, grow);
    return;
  }
  std::fill(grow, grow + W, T(0));
  const PooledRows from = pooled_rows_of(r, p);
  for (int64_t oz = from.z0; oz <= from.z1; ++oz)
    for (int64_t oy = from.y0; oy <= from.y1; ++oy) {
      const T* row = s.rows_p.data() + (oz * axis_y(p).pooled + oy) * W;
#pragma omp simd
      for (int64_t col = 0; col < W; ++col) grow[col] += row[col];
    }
}

// grad_logits of one row: dP/dx times grow[] plus base_scale times the BCE or CE gradient.
// lse is the row's logsumexp in softmax mode (nullptr in sigmoid mode).
template <int kStep, typename scalar_t, typename T, typename Lab>
void full_res_grad_row(const Problem& p, const T* sig, const Lab& lab, const T* grow,
              const scalar_t* xr, const T* lse, T bscale, scalar_t* gr, int64_t gstep) {
  const int64_t W = axis_x(p).size;
  const int64_t xstep = kStep == 1 ? 1 : p.xs[4];
  gstep = kStep == 1 ? 1 : gstep;
  if (p.mode == rmi::kRegionMode) {  // region_mi: P = x * mask, no first term
#pragma omp simd
    for (int64_t col = 0; col < W; ++col)
      gr[col * gstep] = static_cast<scalar_t>(lab.valid(col) ? grow[col] : T(0));
    return;
  }
  if (lse == nullptr) {  // sigmoid mode: BCE gradient
#pragma omp simd
    for (int64_t col = 0; col < W; ++col) {
      const bool valid = lab.valid(col);
      const T base = valid ? bscale * (sig[col] - lab.y(col)) : T(0);
      const T slope = rmi::rmi_prob_slope(sig[col], valid, rmi::kSigmoidMode);
      gr[col * gstep] = static_cast<scalar_t>(grow[col] * slope + base);
    }
    return;
  }
#pragma omp simd
  for (int64_t col = 0; col < W; ++col) {  // softmax mode: CE gradient
    const bool valid = lab.valid(col);
    const T prob = exp_nonpos(static_cast<T>(xr[col * xstep]) - lse[col]);
    const T base = valid ? bscale * (prob * lab.y_sum(col) - lab.y(col)) : T(0);
    const T slope = rmi::rmi_prob_slope(sig[col], valid, rmi::kSoftmaxMode);
    gr[col * gstep] = static_cast<scalar_t>(grow[col] * slope + base);
  }
}

// ---- the ops -------------------------------------------------------------------------------

// The scratch of all threads together stays within 1/kScratchFraction of the logits' bytes: every
// thread keeps a PlaneScratch, so with a few large planes (a volume batch at DF 1: a plane is an
// eighth of the logits for 8 planes) two threads' scratch was half the logits beside the
// gradient. The plane loops then run on fewer threads (at least one; the results do not depend
// on it: each plane is computed alone and summed in a fixed order).
constexpr int64_t kScratchFraction = 4;

// The grain of at::parallel_for over `planes` planes for a per-thread scratch of
// `scratch_bytes`: planes / the number of threads allowed.
inline int64_t plane_grain(int64_t planes, int64_t logits_bytes, int64_t scratch_bytes) {
  const int64_t threads = at::get_num_threads();
  int64_t allowed = logits_bytes / kScratchFraction / std::max<int64_t>(scratch_bytes, 1);
  allowed = std::min(std::max<int64_t>(allowed, 1), threads);
  return (planes + allowed - 1) / allowed;
}

// plane_grain for the PlaneScratch of one pass (see PlaneScratch::bytes).
template <typename T>
int64_t scratch_grain(const Problem& p, const Tensor& logits, const Tensor& labels, bool backward,
                      bool dp_in_gradient) {
  const bool copies_target = at::isFloatingType(labels.scalar_type()) &&
                             !target_planes_direct<T>(p, TargetView(labels));
  return plane_grain(p.N * p.C, logits.numel() * logits.element_size(),
                     PlaneScratch<T>::bytes(p, backward, dp_in_gradient, copies_target));
}

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// f(L{}) with L the class map's type: int16_t when every class id and -1 fit (C < 2^15: half
// the memory of int32_t, a quarter of a float32 plane per image), else int32_t.
template <typename F>
void with_class_type(const Problem& p, F&& f) {
  if (p.C < (int64_t{1} << 15))
    f(int16_t{});
  else
    f(int32_t{});
}

// f(info, labels_of) with the target's pixel pre-pass and labels_of(n, c, scratch), the
// ClassPlane or FloatPlane of plane (n, c) (target_plane: the target's own plane, or a copy in
// the thread's scratch.ys).
template <typename scalar_t, typename T, typename F>
void with_target(const Problem& p, const scalar_t* x, const Tensor& labels,
                 const c10::optional<Tensor>& mask, F&& f) {
  const int64_t S = full_plane(p);
  if (at::isFloatingType(labels.scalar_type())) {
    const FloatPixelInfo<T> info = float_pixel_pass<scalar_t, T>(p, x, labels, mask);
    const TargetView view(labels);
    f(info, [&](int64_t n, int64_t c, PlaneScratch<T>& s) {
      return FloatPlane<T>{target_plane(p, view, n, c, s.ys), info.mask.data() + n * S,
                           p.mode == rmi::kSoftmaxMode ? info.y_sum.data() + n * S : nullptr};
    });
    return;
  }
  with_class_type(p, [&](auto class_type) {
    using L = decltype(class_type);
    const PixelInfo<T, L> info = pixel_pass<scalar_t, T, L>(p, x, labels);
    f(info, [&](int64_t n, int64_t c, PlaneScratch<T>&) {
      return ClassPlane<T, L>{info.cls.data() + n * S, static_cast<int32_t>(c)};
    });
  });
}

rmi::ForwardStatsResult forward_stats_cpu(const Tensor& logits, const Tensor& labels,
                                          at::IntArrayRef radius, at::IntArrayRef stride,
                                          c10::string_view pool, at::IntArrayRef pool_size,
                                          int64_t ignore_index, c10::string_view mode,
                                          const c10::optional<Tensor>& mask) {
  const Problem p = rmi::check_inputs("rmi_ext::forward_stats", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode, mask)
                        .as_volume();
  const auto f64 = logits.options().dtype(at::kDouble);
  Tensor means = at::empty({p.N, p.C, 2, p.d}, f64);
  Tensor cov = at::empty({p.N, p.C, 3, p.d, p.d}, f64);
  double base_sum = 0.0, base_count = 0.0;
  int64_t nonfinite_total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rmi_forward_stats", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    with_target<scalar_t, T>(p, x, labels, mask, [&](const auto& info, auto&& labels_of) {
      const MomentGeometry geom(p);
      const int64_t planes = p.N * p.C;
      std::vector<double> plane_bce(planes, 0.0);
      std::vector<int64_t> plane_bad(planes, 0);
      double* means_p = means.data_ptr<double>();
      double* cov_p = cov.data_ptr<double>();
      const int64_t grain = scratch_grain<T>(p, logits, labels, /*backward=*/false, false);
      at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
        PlaneScratch<T> s;
        s.resize(p, /*backward=*/false);
        std::vector<double> tables;
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / p.C, c = plane % p.C;
          const auto lab = labels_of(n, c, s);
          plane_bce[plane] = first_term_plane(p, x + n * p.xs[0] + c * p.xs[1], lab, s, &plane_bad[plane]);
          pooled_maps_plane(p, lab, s);
          const auto [y_shift, p_shift] = s.centre(pooled_plane(p));
          moment_sums_plane(p, geom, s.y_map(), s.p_map(), y_shift, p_shift,
                        means_p + plane * 2 * p.d, cov_p + plane * 3 * p.d * p.d, tables);
        }
      });
      for (int64_t plane = 0; plane < planes; ++plane) {
        base_sum += plane_bce[plane];
        nonfinite_total += plane_bad[plane];
      }
      if (p.mode == rmi::kSoftmaxMode) base_sum = info.ce_sum;
      base_count = p.mode == rmi::kRegionMode ? 0.0 : info.valid_count;  // no first term
    });
  });
  return {at::scalar_tensor(base_sum, f64), at::scalar_tensor(base_count, f64),
          at::scalar_tensor(nonfinite_total, logits.options().dtype(at::kLong)), means, cov};
}

Tensor backward_grad_cpu(const Tensor& logits, const Tensor& labels, const Tensor& base_scale,
                         const Tensor& coef, const Tensor& shift, at::IntArrayRef radius,
                         at::IntArrayRef stride, c10::string_view pool, at::IntArrayRef pool_size,
                         int64_t ignore_index, c10::string_view mode,
                         const c10::optional<Tensor>& mask) {
  const Problem checked = rmi::check_inputs("rmi_ext::backward_grad", logits, labels, radius,
                                            stride, pool, pool_size, ignore_index, mode, mask);
  rmi::check_backward_inputs(checked, logits, base_scale, coef, shift);
  const Problem p = checked.as_volume();
  const Tensor coef_c = coef.contiguous(), shift_c = shift.contiguous();
  const double scale = *base_scale.const_data_ptr<double>();  // CPU tensor (no aten::item)
  Tensor grad = at::empty_like(logits);
  // The gradient's strides on the three axes (a planar gradient has a z stride of 0).
  const bool planar = grad.dim() == 4;
  const int64_t gN = grad.stride(0), gC = grad.stride(1), gZ = planar ? 0 : grad.stride(2),
                gY = grad.stride(grad.dim() - 2), gX = grad.stride(grad.dim() - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rmi_backward_grad", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* gout = grad.data_ptr<scalar_t>();
    with_target<scalar_t, T>(p, x, labels, mask, [&](const auto& info, auto&& labels_of) {
      const MomentGeometry geom(p);
      const double* coef_p = coef_c.const_data_ptr<double>();
      const double* shift_p = shift_c.const_data_ptr<double>();
      const T bscale = static_cast<T>(scale);
      const int64_t W = axis_x(p).size, S = full_plane(p);
      // Without pooling dloss/dP has the gradient's layout: a contiguous gradient plane of the
      // compute type holds it, instead of a plane of scratch per thread.
      const bool dp_in_gradient = std::is_same_v<scalar_t, T> && !p.pools() && gX == 1 &&
                                  gY == W && (planar || gZ == axis_y(p).size * W);
      const int64_t grain =
          scratch_grain<T>(p, logits, labels, /*backward=*/true, dp_in_gradient);
      at::parallel_for(0, p.N * p.C, grain, [&](int64_t begin, int64_t end) {
        PlaneScratch<T> s;
        s.resize(p, /*backward=*/true, dp_in_gradient);
        std::vector<double> tables;
        std::vector<T> grow(W);
        double unused_bce = 0.0;
        int64_t unused_bad = 0;
        const bool unit_stride = p.xs[4] == 1 && gX == 1;
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / p.C, c = plane % p.C;
          const auto lab = labels_of(n, c, s);
          const scalar_t* xp = x + n * p.xs[0] + c * p.xs[1];
          first_term_plane(p, xp, lab, s, nullptr);
          pooled_maps_plane(p, lab, s);
          const auto [y_shift, p_shift] = s.centre(pooled_plane(p));
          const double* cp = coef_p + plane * 2 * p.d * p.d;
          scalar_t* gp = gout + n * gN + c * gC;
          if constexpr (std::is_same_v<scalar_t, T>) {
            if (dp_in_gradient) s.dp = gp;
          }
          pooled_grad_stencil_plane(p, geom, s.y_map(), s.p_map(), y_shift, p_shift, cp, cp + p.d * p.d,
                        shift_p + plane * p.d, s.dp, tables);
          if (p.pools() && p.pool == rmi::kAvgPool) spread_pooled_columns(p, s);
          if (p.pools() && p.pool != rmi::kAvgPool) pool_adjoint_plane(p, s);
          const T* lse = p.mode == rmi::kSoftmaxMode ? info.lse.data() + n * S : nullptr;
          for (int64_t r = 0; r < full_rows(p); ++r) {
            grad_prob_row(p, r, s, grow.data());
            const int64_t u = r * W;
            const T* lse_r = lse ? lse + u : nullptr;
            const scalar_t* xr = xp + row_offset(p, r, p.xs[2], p.xs[3]);
            scalar_t* gr = gp + row_offset(p, r, gZ, gY);
            T* sig = s.sig_of_row(p, r);
            if (PlaneScratch<T>::row_sigmoid(p))  // recomputed: s.sig holds one row
              sigmoid_row_of<RowExtras::kNone>(p, xp, r, lab, sig, &unused_bce, &unused_bad);
            if (unit_stride)
              full_res_grad_row<1>(p, sig, lab.from(u), grow.data(), xr, lse_r, bscale, gr, 1);
            else
              full_res_grad_row<0>(p, sig, lab.from(u), grow.data(), xr, lse_r, bscale, gr, gX);
          }
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmi_ext, CPU, m) {
  rmi::register_kernels(m, &forward_stats_cpu, &backward_grad_cpu);
}

}  // namespace rmi_cpu
