// CPU kernels of the RMI loss (backend "cpu"): the fused stages of RMI_SPEC.md section 3.
//
// Work is split by (n, c) plane with at::parallel_for; each thread keeps plane-sized scratch
// buffers, so the extra memory is about one plane per thread, at every DF (DF 1 included).
//
// Stage names as in every backend (docs/stages.md): forward_stats, per plane: (a)
// first_term_plane (one pass over the logits: sigmoid, BCE partial sum, non-finite count) and
// pooled_maps_plane (pooled P and Y); (b) moment_sums_plane. backward_grad, per plane: (a) again
// (recomputed, not stored), (d) pooled_grad_stencil_plane, (e) pool_adjoint_plane and
// full_res_grad_row.
//
// Both (b) and (d) use the "lag" form. For offsets o_i, o_j of a region the product sums
// sum_k X[k + o_i] Z[k + o_j] only depend on the lag l = o_j - o_i and on which offsets o_i a
// pixel u = k + o_i can take. Along each axis those sets are the same for all pixels of a
// "segment" (all interior pixels form one segment; each border pixel up to R-1 from an edge is
// its own). So (b) accumulates, per lag and per pair of segments, one dot product of two shifted
// rows (O((2R-1)^2) multiply-adds per pooled pixel instead of O(R^4)), and (d) is a
// (2R-1)x(2R-1) stencil whose coefficients are constant on each pair of segments.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
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

// ---- label pre-pass ------------------------------------------------------------------------

// Per pixel: class id if valid else -1 ([N*H*W] int32), the number of valid pixels and, in
// softmax mode, the per-pixel logsumexp over classes and the CE sum.
template <typename T>
struct PixelInfo {
  std::vector<int32_t> cls;
  std::vector<T> lse;  // softmax mode only
  double valid_count = 0.0;
  double ce_sum = 0.0;
};

template <typename logit_t, typename T>
PixelInfo<T> pixel_pass(const Problem& p, const logit_t* x, const Tensor& labels) {
  PixelInfo<T> info;
  const int64_t HW = p.H() * p.W(), rows = p.N * p.H();
  info.cls.resize(p.N * HW);
  if (p.mode == rmi::kSoftmaxMode) info.lse.resize(p.N * HW);
  std::vector<double> row_count(rows, 0.0), row_ce(rows, 0.0);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "rmi_ext_labels", [&] {
    const auto* lab = labels.data_ptr<scalar_t>();
    const int64_t lN = labels.stride(0), lH = labels.stride(1), lW = labels.stride(2);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> mx(p.W()), sum(p.W());
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / p.H(), r = row % p.H();
        int32_t* cls = info.cls.data() + n * HW + r * p.W();
        double count = 0.0;
        for (int64_t col = 0; col < p.W(); ++col) {
          const int64_t label = static_cast<int64_t>(lab[n * lN + r * lH + col * lW]);
          const bool valid = rmi::is_valid_label(label, p.C, p.ignore_index);
          cls[col] = valid ? static_cast<int32_t>(label) : -1;
          count += valid ? 1.0 : 0.0;
        }
        row_count[row] = count;
        if (p.mode != rmi::kSoftmaxMode) continue;
        const logit_t* xr = x + n * p.xs[0] + r * p.xs[2];
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
        std::fill(sum.begin(), sum.end(), T(0));
        for (int64_t c = 0; c < p.C; ++c)
          for (int64_t col = 0; col < p.W(); ++col)
            mx[col] = std::max(mx[col], static_cast<T>(xr[c * p.xs[1] + col * p.xs[3]]));
        for (int64_t c = 0; c < p.C; ++c)
          for (int64_t col = 0; col < p.W(); ++col)
            sum[col] += exp_nonpos(static_cast<T>(xr[c * p.xs[1] + col * p.xs[3]]) - mx[col]);
        T* lse = info.lse.data() + n * HW + r * p.W();
        double ce = 0.0;
        for (int64_t col = 0; col < p.W(); ++col) {
          lse[col] = mx[col] + std::log(sum[col]);
          if (cls[col] >= 0) ce += lse[col] - static_cast<T>(xr[cls[col] * p.xs[1] + col * p.xs[3]]);
        }
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

// ---- stage (a): one plane at full resolution, then pooled ---------------------------------

// Scratch buffers of one thread, reused across its planes.
template <typename T>
struct PlaneScratch {
  std::vector<T> sig;            // [H*W] sigmoid of the plane
  // Pooled maps in the compute type: float keeps the per-thread scratch small at DF 1; every sum
  // over them is accumulated in float64.
  std::vector<T> yp, pp;         // [h*w] pooled Y and P, then centred
  std::vector<T> grad_pp;        // [h*w] dloss/dP on the pooled map (backward)
  std::vector<T> grad_full;      // [H*W] dloss/dP at full resolution (backward, max/interp)
  std::vector<T> row_a, row_b;   // [W] one full-resolution row
  std::vector<T> rows_p, rows_y; // [h*W] average pooling: column sums per pooled row; backward:
                                 // rows_p holds the pooled gradient spread over columns
  std::vector<int64_t> argmax;   // [h*w] max pooling: the full-resolution index of each maximum

  void resize(const Problem& p, bool backward) {
    sig.resize(p.H() * p.W()), yp.resize(p.h() * p.w()), pp.resize(p.h() * p.w());
    row_a.resize(p.W()), row_b.resize(p.W());
    if (p.factor() > 1 && p.pool == rmi::kAvgPool)
      rows_p.resize(p.h() * p.W()), rows_y.resize(p.h() * p.W());
    if (p.factor() > 1 && p.pool == rmi::kMaxPool) argmax.resize(p.h() * p.w());
    if (!backward) return;
    grad_pp.resize(p.h() * p.w());
    if (p.factor() > 1 && p.pool != rmi::kAvgPool) grad_full.resize(p.H() * p.W());
  }
};

// What a row pass computes besides the sigmoid: the backward needs nothing else; the forward
// counts non-finite logits and, in sigmoid mode only, adds the masked BCE (softmax mode takes
// its CE from the pixel pre-pass).
enum class RowExtras { kNone, kNonFinite, kNonFiniteAndBce };

// Sigmoid of one row into sig[], plus the RowExtras: the row's BCE added to *bce, the number of
// non-finite logits to *bad. kStep: 1 for rows with unit stride (the loop then vectorises), 0
// for any other stride `step`.
template <int kStep, RowExtras kExtras, typename scalar_t, typename T>
void sigmoid_row(const scalar_t* xr, int64_t step, int64_t W, const int32_t* cls, int32_t c,
                 T* sig, double* bce, int64_t* bad) {
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
      const T loss = (x > T(0) ? x : T(0)) - (cls[col] == c ? x : T(0)) + log1p_unit(e);
      row_bce += cls[col] >= 0 ? loss : T(0);
    }
  }
  *bce += static_cast<double>(row_bce);
  *bad += static_cast<int64_t>(row_bad);
}

template <RowExtras kExtras, typename scalar_t, typename T>
void sigmoid_rows(const Problem& p, const scalar_t* xp, const int32_t* cls, int32_t c, T* sig,
                  double* bce, int64_t* bad) {
  for (int64_t r = 0; r < p.H(); ++r) {
    if (p.xs[3] == 1)
      sigmoid_row<1, kExtras>(xp + r * p.xs[2], 1, p.W(), cls + r * p.W(), c, sig + r * p.W(),
                              bce, bad);
    else
      sigmoid_row<0, kExtras>(xp + r * p.xs[2], p.xs[3], p.W(), cls + r * p.W(), c,
                              sig + r * p.W(), bce, bad);
  }
}

// Sigmoid of one plane into s.sig. With a non-null `nonfinite` (forward) also counts the
// non-finite logits into it and returns the plane's BCE sum in sigmoid mode (0 otherwise).
template <typename scalar_t, typename T>
double first_term_plane(const Problem& p, const scalar_t* xp, const int32_t* cls, int64_t c,
                     PlaneScratch<T>& s, int64_t* nonfinite) {
  double bce = 0.0;
  int64_t bad = 0;
  const int32_t cc = static_cast<int32_t>(c);
  if (nonfinite == nullptr)
    sigmoid_rows<RowExtras::kNone>(p, xp, cls, cc, s.sig.data(), &bce, &bad);
  else if (p.mode == rmi::kSigmoidMode)
    sigmoid_rows<RowExtras::kNonFiniteAndBce>(p, xp, cls, cc, s.sig.data(), &bce, &bad);
  else
    sigmoid_rows<RowExtras::kNonFinite>(p, xp, cls, cc, s.sig.data(), &bce, &bad);
  if (nonfinite) *nonfinite += bad;
  return bce;
}

// Pooled rows whose average-pool window holds input row r: [*lo, *hi] (empty when lo > hi).
inline void pooled_rows_of(int64_t r, const Problem& p, int64_t* lo, int64_t* hi) {
  const int64_t pad = p.kernel() / 2, below = r + pad - p.kernel();  // oy > below / s
  *lo = below < 0 ? 0 : below / p.factor() + 1;
  *hi = std::min(p.h() - 1, (r + pad) / p.factor());
}

// P and Y of one full-resolution row of class c (vectorised).
template <typename T>
void prob_row(const Problem& p, const T* sig, const int32_t* cls, int32_t c, T* prow, T* yrow) {
  // One loop per mode: a mode test inside the loop would stop it from vectorising.
  if (p.mode == rmi::kSigmoidMode) {
#pragma omp simd
    for (int64_t col = 0; col < p.W(); ++col) {
      prow[col] = rmi::rmi_prob(sig[col], cls[col] >= 0, rmi::kSigmoidMode);
      yrow[col] = cls[col] == c ? T(1) : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t col = 0; col < p.W(); ++col) {
      prow[col] = rmi::rmi_prob(sig[col], cls[col] >= 0, rmi::kSoftmaxMode);
      yrow[col] = cls[col] == c ? T(1) : T(0);
    }
  }
}

// Pooled Y and P of one plane (from s.sig and the class map) into s.yp, s.pp.
template <typename T>
void pooled_maps_plane(const Problem& p, const int32_t* cls, int64_t c, PlaneScratch<T>& s) {
  const T* sig = s.sig.data();
  auto prob = [&](int64_t u) { return rmi::rmi_prob(sig[u], cls[u] >= 0, p.mode); };
  const int32_t cc = static_cast<int32_t>(c);
  T* prow = s.row_a.data();
  T* yrow = s.row_b.data();
  if (p.factor() == 1) {  // the pooled maps are the full-resolution ones
    for (int64_t r = 0; r < p.H(); ++r)
      prob_row(p, sig + r * p.W(), cls + r * p.W(), cc, s.pp.data() + r * p.W(),
               s.yp.data() + r * p.W());
    return;
  }
  const int64_t k = p.kernel(), st = p.factor();
  if (p.pool == rmi::kAvgPool) {
    // Sum the rows of each pooled row's window first (vector adds over W), then the columns.
    std::fill(s.rows_p.begin(), s.rows_p.end(), T(0));
    std::fill(s.rows_y.begin(), s.rows_y.end(), T(0));
    for (int64_t r = 0; r < p.H(); ++r) {
      int64_t oy_lo, oy_hi;
      pooled_rows_of(r, p, &oy_lo, &oy_hi);
      if (oy_lo > oy_hi) continue;
      prob_row(p, sig + r * p.W(), cls + r * p.W(), cc, prow, yrow);
      for (int64_t oy = oy_lo; oy <= oy_hi; ++oy) {
        T* ap = s.rows_p.data() + oy * p.W();
        T* ay = s.rows_y.data() + oy * p.W();
#pragma omp simd
        for (int64_t col = 0; col < p.W(); ++col) ap[col] += prow[col], ay[col] += yrow[col];
      }
    }
    const double inv_area = 1.0 / static_cast<double>(k * k);
    for (int64_t oy = 0; oy < p.h(); ++oy) {
      const T* ap = s.rows_p.data() + oy * p.W();
      const T* ay = s.rows_y.data() + oy * p.W();
      for (int64_t ox = 0; ox < p.w(); ++ox) {
        int64_t x0, x1;
        rmi::pool_window(ox, p.W(), k, st, &x0, &x1);
        T sp = T(0), sy = T(0);
        for (int64_t xx = x0; xx < x1; ++xx) sp += ap[xx], sy += ay[xx];
        s.pp[oy * p.w() + ox] = static_cast<T>(static_cast<double>(sp) * inv_area);
        s.yp[oy * p.w() + ox] = static_cast<T>(static_cast<double>(sy) * inv_area);
      }
    }
    return;
  }
  if (p.pool == rmi::kInterp) {  // P bilinear (align_corners=True), Y nearest
    for (int64_t oy = 0; oy < p.h(); ++oy) {
      const auto ty = rmi::linear_tap<T>(oy, p.H(), p.h());
      const int64_t src_row = rmi::nearest_source(oy, p.H(), p.h()) * p.W();
      for (int64_t ox = 0; ox < p.w(); ++ox) {
        const auto tx = rmi::linear_tap<T>(ox, p.W(), p.w());
        const T top = tx.w0 * prob(ty.i0 * p.W() + tx.i0) + tx.w1 * prob(ty.i0 * p.W() + tx.i1);
        const T bottom = tx.w0 * prob(ty.i1 * p.W() + tx.i0) + tx.w1 * prob(ty.i1 * p.W() + tx.i1);
        s.pp[oy * p.w() + ox] = ty.w0 * top + ty.w1 * bottom;
        s.yp[oy * p.w() + ox] =
            cls[src_row + rmi::nearest_source(ox, p.W(), p.w())] == c ? T(1) : T(0);
      }
    }
    return;
  }
  // Max pooling (-inf padding): P the window maximum, Y whether any window pixel is class c;
  // s.argmax keeps where the maximum is (the first in row-major window order, as max_pool2d
  // picks it) for the backward's pooling adjoint.
  for (int64_t oy = 0; oy < p.h(); ++oy) {
    int64_t y0, y1;
    rmi::pool_window(oy, p.H(), k, st, &y0, &y1);
    for (int64_t ox = 0; ox < p.w(); ++ox) {
      int64_t x0, x1;
      rmi::pool_window(ox, p.W(), k, st, &x0, &x1);
      T best = -std::numeric_limits<T>::infinity();
      int64_t arg = y0 * p.W() + x0;
      bool any = false;
      for (int64_t yy = y0; yy < y1; ++yy)
        for (int64_t xx = x0; xx < x1; ++xx) {
          const int64_t u = yy * p.W() + xx;
          const T v = prob(u);
          if (v > best) best = v, arg = u;
          any = any || cls[u] == c;
        }
      s.pp[oy * p.w() + ox] = best;
      s.yp[oy * p.w() + ox] = any ? T(1) : T(0);
      s.argmax[oy * p.w() + ox] = arg;
    }
  }
}

// Subtract the plane mean (covariances do not change; the raw-sum form then cancels far less).
template <typename M>
double centre(std::vector<M>& map) {
  double sum = 0.0;
  for (M v : map) sum += v;
  const double mean = sum / static_cast<double>(map.size());
  for (M& v : map) v = static_cast<M>(v - mean);
  return mean;
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

// Lags l = (ey, ex) in [-(R-1), R-1]^2, indexed (ey + R-1) * (2R-1) + (ex + R-1).
struct Lags {
  int64_t R, side, count;
  explicit Lags(int64_t radius) : R(radius), side(2 * radius - 1), count(side * side) {}
  int64_t index(int64_t ey, int64_t ex) const { return (ey + R - 1) * side + (ex + R - 1); }
  int64_t ey(int64_t l) const { return l / side - (R - 1); }
  int64_t ex(int64_t l) const { return l % side - (R - 1); }
  // One of l, -l: symmetric products (Y.Y, P.P) are accumulated for these lags only.
  bool upper(int64_t l) const { return ey(l) > 0 || (ey(l) == 0 && ex(l) >= 0); }
};

// Columns [b, e) of segment sx where u + ex stays inside [0, w).
inline bool lag_columns(const Segments& sx, int64_t s, int64_t ex, int64_t w, int64_t* b,
                        int64_t* e) {
  *b = std::max(sx.begin[s], -ex);
  *e = std::min(sx.end[s], w - ex);
  return *b < *e;
}

// ---- stage (b): moments --------------------------------------------------------------------

struct MomentGeometry {
  Segments sy, sx;
  Lags lags;
  MomentGeometry(int64_t h, int64_t w, int64_t R) : sy(make_segments(h, R)), sx(make_segments(w, R)), lags(R) {}
  int64_t cells() const { return sy.count() * sx.count(); }
  // Sum of table[cell] over the cells whose pixels admit offset (oy, ox).
  double rect(const double* table, int64_t oy, int64_t ox) const {
    double sum = 0.0;
    for (int64_t a = sy.first[oy]; a <= sy.last[oy]; ++a)
      for (int64_t b = sx.first[ox]; b <= sx.last[ox]; ++b) sum += table[a * sx.count() + b];
    return sum;
  }
};

// means [2, d] (mu_y, mu_p) and cov [3, d, d] (Sy, Sp, B) of one plane from centred yp, pp.
template <typename M>
void moment_sums_plane(const Problem& p, const MomentGeometry& g, const M* yc, const M* pc,
                   double y_shift, double p_shift, double* means, double* cov,
                   std::vector<double>& tables) {
  const int64_t cells = g.cells(), nsx = g.sx.count(), L = g.lags.count, w = p.w(), h = p.h();
  // tables: [L][cells] for Y.P, Y.Y, P.P, then [cells] sums of Y and P.
  tables.assign(3 * L * cells + 2 * cells, 0.0);
  double* t_yp = tables.data();
  double* t_yy = t_yp + L * cells;
  double* t_pp = t_yy + L * cells;
  double* t_y = t_pp + L * cells;
  double* t_p = t_y + cells;
  for (int64_t a = 0; a < g.sy.count(); ++a) {
    for (int64_t u = g.sy.begin[a]; u < g.sy.end[a]; ++u) {
      const M* y0 = yc + u * w;
      const M* p0 = pc + u * w;
      for (int64_t b = 0; b < nsx; ++b) {
        double sy = 0.0, sp = 0.0;
        for (int64_t col = g.sx.begin[b]; col < g.sx.end[b]; ++col) sy += y0[col], sp += p0[col];
        t_y[a * nsx + b] += sy, t_p[a * nsx + b] += sp;
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t ey = g.lags.ey(l), ex = g.lags.ex(l), v = u + ey;
        if (v < 0 || v >= h) continue;
        const M* y1 = yc + v * w + ex;
        const M* p1 = pc + v * w + ex;
        const bool upper = g.lags.upper(l);
        for (int64_t b = 0; b < nsx; ++b) {
          int64_t c0, c1;
          if (!lag_columns(g.sx, b, ex, w, &c0, &c1)) continue;
          double s_yp = 0.0, s_yy = 0.0, s_pp = 0.0;
          if (upper) {
#pragma omp simd reduction(+ : s_yp, s_yy, s_pp)
            for (int64_t col = c0; col < c1; ++col) {
              const double ya = y0[col], pa = p0[col], pb = p1[col];
              s_yp += ya * pb;
              s_yy += ya * static_cast<double>(y1[col]);
              s_pp += pa * pb;
            }
            t_yy[l * cells + a * nsx + b] += s_yy;
            t_pp[l * cells + a * nsx + b] += s_pp;
          } else {
#pragma omp simd reduction(+ : s_yp)
            for (int64_t col = c0; col < c1; ++col)
              s_yp += static_cast<double>(y0[col]) * static_cast<double>(p1[col]);
          }
          t_yp[l * cells + a * nsx + b] += s_yp;
        }
      }
    }
  }
  const int64_t R = p.radius(), d = p.d;
  const double K = static_cast<double>((h - R + 1) * (w - R + 1));
  std::vector<double> mu_y(d), mu_p(d);  // means of the centred maps
  for (int64_t i = 0; i < d; ++i) {
    mu_y[i] = g.rect(t_y, i / R, i % R) / K;
    mu_p[i] = g.rect(t_p, i / R, i % R) / K;
    means[i] = mu_y[i] + y_shift;
    means[d + i] = mu_p[i] + p_shift;
  }
  double* s_y = cov;
  double* s_p = cov + d * d;
  double* s_b = cov + 2 * d * d;
  for (int64_t i = 0; i < d; ++i) {
    const int64_t iy = i / R, ix = i % R;
    for (int64_t j = 0; j < d; ++j) {
      const int64_t l = g.lags.index(j / R - iy, j % R - ix);
      s_b[i * d + j] = g.rect(t_yp + l * cells, iy, ix) - K * mu_y[i] * mu_p[j];
      if (!g.lags.upper(l)) continue;
      const double vy = g.rect(t_yy + l * cells, iy, ix) - K * mu_y[i] * mu_y[j];
      const double vp = g.rect(t_pp + l * cells, iy, ix) - K * mu_p[i] * mu_p[j];
      s_y[i * d + j] = s_y[j * d + i] = vy;
      s_p[i * d + j] = s_p[j * d + i] = vp;
    }
  }
}

// ---- stage (d): pooled-map stencil ---------------------------------------------------------

// dloss/dP on the pooled map: window k gets g_k = Cp p_k + Cy y_k + c, entry i lands on k + o_i.
// In lag form, dP[u] = const(cell) + sum_l Kp_l(cell) P[u + l] + Ky_l(cell) Y[u + l].
template <typename M>
void pooled_grad_stencil_plane(const Problem& p, const MomentGeometry& g, const M* yc, const M* pc,
                   double y_shift, double p_shift, const double* cp, const double* cy,
                   const double* shift, M* out, std::vector<double>& tables) {
  const int64_t R = p.radius(), d = p.d, L = g.lags.count, cells = g.cells(), nsx = g.sx.count();
  const int64_t w = p.w(), h = p.h(), P = R + 1;  // prefix tables are P x P, P = R + 1
  tables.assign(2 * L * cells + cells + 3 * P * P, 0.0);
  double* k_p = tables.data();
  double* k_y = k_p + L * cells;
  double* k_c = k_y + L * cells;
  double* pre_p = k_c + cells;
  double* pre_y = pre_p + P * P;
  double* pre_c = pre_y + P * P;
  // Sum of a prefix table over offsets [lo_y, hi_y] x [lo_x, hi_x] of cell (a, b).
  auto box = [&](const double* pre, int64_t a, int64_t b) {
    const int64_t y0 = g.sy.lo[a], y1 = g.sy.hi[a] + 1, x0 = g.sx.lo[b], x1 = g.sx.hi[b] + 1;
    return pre[y1 * P + x1] - pre[y0 * P + x1] - pre[y1 * P + x0] + pre[y0 * P + x0];
  };
  auto prefix = [&](double* pre, auto value) {  // pre[(iy+1)*P + ix+1] = sum over iy' <= iy, ix' <= ix
    for (int64_t iy = 0; iy < R; ++iy)
      for (int64_t ix = 0; ix < R; ++ix)
        pre[(iy + 1) * P + ix + 1] = value(iy, ix) + pre[iy * P + ix + 1] + pre[(iy + 1) * P + ix] - pre[iy * P + ix];
  };
  prefix(pre_c, [&](int64_t iy, int64_t ix) { return shift[iy * R + ix]; });
  for (int64_t a = 0; a < g.sy.count(); ++a)
    for (int64_t b = 0; b < nsx; ++b) k_c[a * nsx + b] = box(pre_c, a, b);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t ey = g.lags.ey(l), ex = g.lags.ex(l);
    auto coef = [&](const double* m) {
      return [=](int64_t iy, int64_t ix) {
        const int64_t jy = iy + ey, jx = ix + ex;
        if (jy < 0 || jy >= R || jx < 0 || jx >= R) return 0.0;
        return m[(iy * R + ix) * d + jy * R + jx];
      };
    };
    prefix(pre_p, coef(cp));
    prefix(pre_y, coef(cy));
    for (int64_t a = 0; a < g.sy.count(); ++a)
      for (int64_t b = 0; b < nsx; ++b) {
        const double vp = box(pre_p, a, b), vy = box(pre_y, a, b);
        k_p[l * cells + a * nsx + b] = vp;
        k_y[l * cells + a * nsx + b] = vy;
        k_c[a * nsx + b] += vp * p_shift + vy * y_shift;  // the maps are centred
      }
  }
  for (int64_t a = 0; a < g.sy.count(); ++a) {
    for (int64_t u = g.sy.begin[a]; u < g.sy.end[a]; ++u) {
      M* o = out + u * w;
      for (int64_t b = 0; b < nsx; ++b)
        for (int64_t col = g.sx.begin[b]; col < g.sx.end[b]; ++col) o[col] = static_cast<M>(k_c[a * nsx + b]);
      for (int64_t l = 0; l < L; ++l) {
        const int64_t ey = g.lags.ey(l), ex = g.lags.ex(l), v = u + ey;
        if (v < 0 || v >= h) continue;
        const M* y1 = yc + v * w + ex;
        const M* p1 = pc + v * w + ex;
        for (int64_t b = 0; b < nsx; ++b) {
          const M kp = static_cast<M>(k_p[l * cells + a * nsx + b]);
          const M ky = static_cast<M>(k_y[l * cells + a * nsx + b]);
          int64_t c0, c1;
          if ((kp == M(0) && ky == M(0)) || !lag_columns(g.sx, b, ex, w, &c0, &c1)) continue;
#pragma omp simd
          for (int64_t col = c0; col < c1; ++col) o[col] += kp * p1[col] + ky * y1[col];
        }
      }
    }
  }
}

// ---- stage (e): pooling adjoint and the full-resolution gradient ---------------------------

// dloss/dP at full resolution from the pooled-map gradient s.grad_pp, into s.grad_full
// (max and interp; average pooling is spread row by row in grad_prob_row).
template <typename T>
void pool_adjoint_plane(const Problem& p, PlaneScratch<T>& s) {
  std::fill(s.grad_full.begin(), s.grad_full.end(), T(0));
  T* out = s.grad_full.data();
  for (int64_t oy = 0; oy < p.h(); ++oy) {
    for (int64_t ox = 0; ox < p.w(); ++ox) {
      const double gpool = s.grad_pp[oy * p.w() + ox];
      if (p.pool == rmi::kInterp) {
        const auto ty = rmi::linear_tap<T>(oy, p.H(), p.h());
        const auto tx = rmi::linear_tap<T>(ox, p.W(), p.w());
        const T gv = static_cast<T>(gpool);
        out[ty.i0 * p.W() + tx.i0] += ty.w0 * tx.w0 * gv;
        out[ty.i0 * p.W() + tx.i1] += ty.w0 * tx.w1 * gv;
        out[ty.i1 * p.W() + tx.i0] += ty.w1 * tx.w0 * gv;
        out[ty.i1 * p.W() + tx.i1] += ty.w1 * tx.w1 * gv;
        continue;
      }
      // max: where pooled_maps_plane found it
      out[s.argmax[oy * p.w() + ox]] += static_cast<T>(gpool);
    }
  }
}

// Average pooling adjoint, columns: s.rows_p[oy][col] = sum over ox covering col of
// grad_pp[oy][ox] / k^2 (the rows are added per full-resolution row in grad_prob_row).
template <typename T>
void spread_pooled_columns(const Problem& p, PlaneScratch<T>& s) {
  std::fill(s.rows_p.begin(), s.rows_p.end(), T(0));
  const double inv_area = 1.0 / static_cast<double>(p.kernel() * p.kernel());
  for (int64_t oy = 0; oy < p.h(); ++oy) {
    T* row = s.rows_p.data() + oy * p.W();
    for (int64_t ox = 0; ox < p.w(); ++ox) {
      const T v = static_cast<T>(s.grad_pp[oy * p.w() + ox] * inv_area);
      int64_t x0, x1;
      rmi::pool_window(ox, p.W(), p.kernel(), p.factor(), &x0, &x1);
      for (int64_t xx = x0; xx < x1; ++xx) row[xx] += v;
    }
  }
}

// dloss/dP of full-resolution row r into grow[], from the pooled-map gradient.
template <typename T>
void grad_prob_row(const Problem& p, int64_t r, PlaneScratch<T>& s, T* grow) {
  if (p.factor() == 1) {
    std::copy(s.grad_pp.begin() + r * p.W(), s.grad_pp.begin() + (r + 1) * p.W(), grow);
    return;
  }
  if (p.pool != rmi::kAvgPool) {
    std::copy(s.grad_full.begin() + r * p.W(), s.grad_full.begin() + (r + 1) * p.W(), grow);
    return;
  }
  std::fill(grow, grow + p.W(), T(0));
  int64_t oy_lo, oy_hi;
  pooled_rows_of(r, p, &oy_lo, &oy_hi);
  for (int64_t oy = oy_lo; oy <= oy_hi; ++oy) {
    const T* row = s.rows_p.data() + oy * p.W();
#pragma omp simd
    for (int64_t col = 0; col < p.W(); ++col) grow[col] += row[col];
  }
}

// grad_logits of one row: dP/dx times grow[] plus base_scale times the BCE or CE gradient.
// lse is the row's logsumexp in softmax mode (nullptr in sigmoid mode).
template <int kStep, typename scalar_t, typename T>
void full_res_grad_row(const Problem& p, const T* sig, const int32_t* cls, int32_t c, const T* grow,
              const scalar_t* xr, const T* lse, T bscale, scalar_t* gr, int64_t gstep) {
  const int64_t xstep = kStep == 1 ? 1 : p.xs[3];
  gstep = kStep == 1 ? 1 : gstep;
  if (lse == nullptr) {  // sigmoid mode: BCE gradient
#pragma omp simd
    for (int64_t col = 0; col < p.W(); ++col) {
      const bool valid = cls[col] >= 0;
      const T base = valid ? bscale * (sig[col] - (cls[col] == c ? T(1) : T(0))) : T(0);
      const T slope = rmi::rmi_prob_slope(sig[col], valid, rmi::kSigmoidMode);
      gr[col * gstep] = static_cast<scalar_t>(grow[col] * slope + base);
    }
    return;
  }
#pragma omp simd
  for (int64_t col = 0; col < p.W(); ++col) {  // softmax mode: CE gradient
    const bool valid = cls[col] >= 0;
    const T prob = exp_nonpos(static_cast<T>(xr[col * xstep]) - lse[col]);
    const T base = valid ? bscale * (prob - (cls[col] == c ? T(1) : T(0))) : T(0);
    const T slope = rmi::rmi_prob_slope(sig[col], valid, rmi::kSoftmaxMode);
    gr[col * gstep] = static_cast<scalar_t>(grow[col] * slope + base);
  }
}

// ---- the ops -------------------------------------------------------------------------------

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

rmi::ForwardStatsResult forward_stats_cpu(const Tensor& logits, const Tensor& labels,
                                          int64_t radius, int64_t stride, c10::string_view pool,
                                          int64_t pool_size, int64_t ignore_index,
                                          c10::string_view mode) {
  const Problem p = rmi::check_inputs("rmi_ext::forward_stats", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode);
  const auto f64 = logits.options().dtype(at::kDouble);
  Tensor means = at::empty({p.N, p.C, 2, p.d}, f64);
  Tensor cov = at::empty({p.N, p.C, 3, p.d, p.d}, f64);
  double base_sum = 0.0, base_count = 0.0;
  int64_t nonfinite_total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rmi_forward_stats", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const PixelInfo<T> info = pixel_pass<scalar_t, T>(p, x, labels);
    const MomentGeometry geom(p.h(), p.w(), p.radius());
    const int64_t planes = p.N * p.C;
    std::vector<double> plane_bce(planes, 0.0);
    std::vector<int64_t> plane_bad(planes, 0);
    double* means_p = means.data_ptr<double>();
    double* cov_p = cov.data_ptr<double>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
      PlaneScratch<T> s;
      s.resize(p, /*backward=*/false);
      std::vector<double> tables;
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / p.C, c = plane % p.C;
        const int32_t* cls = info.cls.data() + n * p.H() * p.W();
        plane_bce[plane] = first_term_plane(p, x + n * p.xs[0] + c * p.xs[1], cls, c, s, &plane_bad[plane]);
        pooled_maps_plane(p, cls, c, s);
        const double y_shift = centre(s.yp), p_shift = centre(s.pp);
        moment_sums_plane(p, geom, s.yp.data(), s.pp.data(), y_shift, p_shift,
                      means_p + plane * 2 * p.d, cov_p + plane * 3 * p.d * p.d, tables);
      }
    });
    for (int64_t plane = 0; plane < planes; ++plane) {
      base_sum += plane_bce[plane];
      nonfinite_total += plane_bad[plane];
    }
    if (p.mode == rmi::kSoftmaxMode) base_sum = info.ce_sum;
    base_count = info.valid_count;
  });
  return {at::scalar_tensor(base_sum, f64), at::scalar_tensor(base_count, f64),
          at::scalar_tensor(nonfinite_total, logits.options().dtype(at::kLong)), means, cov};
}

Tensor backward_grad_cpu(const Tensor& logits, const Tensor& labels, const Tensor& base_scale,
                         const Tensor& coef, const Tensor& shift, int64_t radius, int64_t stride,
                         c10::string_view pool, int64_t pool_size, int64_t ignore_index,
                         c10::string_view mode) {
  const Problem p = rmi::check_inputs("rmi_ext::backward_grad", logits, labels, radius, stride,
                                      pool, pool_size, ignore_index, mode);
  rmi::check_backward_inputs(p, logits, base_scale, coef, shift);
  const Tensor coef_c = coef.contiguous(), shift_c = shift.contiguous();
  const double scale = *base_scale.const_data_ptr<double>();  // CPU tensor (no aten::item)
  Tensor grad = at::empty_like(logits);
  const int64_t gN = grad.stride(0), gC = grad.stride(1), gH = grad.stride(2), gW = grad.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rmi_backward_grad", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* gout = grad.data_ptr<scalar_t>();
    const PixelInfo<T> info = pixel_pass<scalar_t, T>(p, x, labels);
    const MomentGeometry geom(p.h(), p.w(), p.radius());
    const double* coef_p = coef_c.const_data_ptr<double>();
    const double* shift_p = shift_c.const_data_ptr<double>();
    const T bscale = static_cast<T>(scale);
    at::parallel_for(0, p.N * p.C, 1, [&](int64_t begin, int64_t end) {
      PlaneScratch<T> s;
      s.resize(p, /*backward=*/true);
      std::vector<double> tables;
      std::vector<T> grow(p.W());
      const bool unit_stride = p.xs[3] == 1 && gW == 1;
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / p.C, c = plane % p.C;
        const int32_t* cls = info.cls.data() + n * p.H() * p.W();
        const scalar_t* xp = x + n * p.xs[0] + c * p.xs[1];
        first_term_plane(p, xp, cls, c, s, nullptr);
        pooled_maps_plane(p, cls, c, s);
        const double y_shift = centre(s.yp), p_shift = centre(s.pp);
        const double* cp = coef_p + plane * 2 * p.d * p.d;
        pooled_grad_stencil_plane(p, geom, s.yp.data(), s.pp.data(), y_shift, p_shift, cp, cp + p.d * p.d,
                      shift_p + plane * p.d, s.grad_pp.data(), tables);
        if (p.factor() > 1 && p.pool == rmi::kAvgPool) spread_pooled_columns(p, s);
        if (p.factor() > 1 && p.pool != rmi::kAvgPool) pool_adjoint_plane(p, s);
        const T* lse = p.mode == rmi::kSoftmaxMode ? info.lse.data() + n * p.H() * p.W() : nullptr;
        scalar_t* gp = gout + n * gN + c * gC;
        for (int64_t r = 0; r < p.H(); ++r) {
          grad_prob_row(p, r, s, grow.data());
          const int64_t u = r * p.W();
          const T* lse_r = lse ? lse + u : nullptr;
          if (unit_stride)
            full_res_grad_row<1>(p, s.sig.data() + u, cls + u, int32_t(c), grow.data(), xp + r * p.xs[2], lse_r, bscale, gp + r * gH, 1);
          else
            full_res_grad_row<0>(p, s.sig.data() + u, cls + u, int32_t(c), grow.data(), xp + r * p.xs[2], lse_r, bscale, gp + r * gH, gW);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmi_ext, CPU, m) {
  rmi::register_kernels(m, &forward_stats_cpu, &backward_grad_cpu);
}

}  // namespace rmi_cpu
