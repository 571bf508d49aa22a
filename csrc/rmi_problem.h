// One RMI problem: sizes, strides, pooling geometry and option codes of one call, shared by the
// CPU (csrc/cpu) and CUDA (csrc/cuda) kernels. Torch-free, like rmi_math.h; the torch-side
// checks that build it are in rmi_ops.h.
//
// Every spatial quantity is stored per axis (`Axis`), outermost first, for up to
// kMaxSpatialAxes axes: a volume ([N, C, D, H, W]) or per-axis radius / stride / pool size
// (RMI_SPEC.md section 5) is a Problem with rank 3 or with unequal axes, built here and nowhere
// else. The CPU kernels read every problem on three axes (`as_volume()`); the CUDA kernels are
// planar and isotropic (rank 2, one radius, factor and kernel on both axes:
// `is_planar_isotropic()`) and read the problem through the planar accessors H() ... kernel().
#pragma once

#include <cstdint>

#include "rmi_math.h"

namespace rmi {

constexpr int64_t kMaxRadius = 10;        // region side along one axis is in [1, kMaxRadius]
constexpr int64_t kMaxRegionLength = 100;  // d, the product of the region sides
constexpr int kMaxSpatialAxes = 3;         // (D,) H, W

// One spatial axis of a problem. Sizes and strides are in elements; every index is int64_t.
struct Axis {
  int64_t size;    // logits length along the axis
  int64_t pooled;  // length of the pooled (downsampled) maps
  int64_t radius;  // region side along the axis
  int64_t factor;  // downsampling factor (the `stride` option)
  int64_t kernel;  // pool kernel, padding kernel / 2
};

struct Problem {
  int64_t N, C;                      // batch and classes
  int rank;                          // number of spatial axes (2 or 3)
  Axis axis[kMaxSpatialAxes];        // axis[0 .. rank), outermost first
  int64_t xs[2 + kMaxSpatialAxes];   // logits strides: N, C, then the spatial axes
  int64_t ls[1 + kMaxSpatialAxes];   // labels strides: N, then the spatial axes
  int64_t d;                         // product of the region sides, the region vector length
  int pool;                          // PoolKind
  int mode;                          // LossMode
  int64_t ignore_index;

  // Whether the maps are downsampled: some factor is > 1 (then every axis is pooled with its own
  // kernel and factor; RMI_SPEC.md section 5).
  RMI_HD bool pools() const {
    bool any = false;
    for (int i = 0; i < rank; ++i) any = any || axis[i].factor > 1;
    return any;
  }
  // The same problem on three spatial axes (z, y, x): a planar problem gets a leading axis of
  // length 1 (region side, factor and kernel 1, strides 0), so one kernel serves both ranks.
  RMI_HD Problem as_volume() const {
    if (rank == 3) return *this;
    Problem v = *this;
    v.rank = 3;
    v.axis[0] = Axis{1, 1, 1, 1, 1};
    for (int i = 0; i < 2; ++i) v.axis[1 + i] = axis[i];
    v.xs[2] = 0, v.xs[3] = xs[2], v.xs[4] = xs[3];
    v.ls[1] = 0, v.ls[2] = ls[1], v.ls[3] = ls[2];
    return v;
  }
  RMI_HD bool is_planar_isotropic() const {
    return rank == 2 && axis[0].radius == axis[1].radius && axis[0].factor == axis[1].factor &&
           axis[0].kernel == axis[1].kernel;
  }
  // The planar kernels' view (rank 2, isotropic): logits [N, C, H, W], pooled maps
  // [N, C, h, w], region side R, factor s, pool kernel k.
  RMI_HD int64_t H() const { return axis[0].size; }
  RMI_HD int64_t W() const { return axis[1].size; }
  RMI_HD int64_t h() const { return axis[0].pooled; }
  RMI_HD int64_t w() const { return axis[1].pooled; }
  RMI_HD int64_t radius() const { return axis[0].radius; }
  RMI_HD int64_t factor() const { return axis[0].factor; }
  RMI_HD int64_t kernel() const { return axis[0].kernel; }
};

// A problem of `rank` spatial axes: sizes [N, C, spatial...], logits strides [2 + rank], labels
// strides [1 + rank], and per axis the region side, the factor and the pool kernel.
inline Problem make_problem(int rank, const int64_t* sizes, const int64_t* x_strides,
                            const int64_t* l_strides, const int64_t* radius,
                            const int64_t* factor, const int64_t* kernel, int pool,
                            int64_t ignore_index, int mode) {
  Problem p = {};
  p.N = sizes[0];
  p.C = sizes[1];
  p.rank = rank;
  p.d = 1;
  for (int i = 0; i < rank; ++i) {
    Axis& a = p.axis[i];
    a.size = sizes[2 + i];
    a.radius = radius[i];
    a.factor = factor[i];
    a.kernel = kernel[i];
    p.d *= a.radius;
  }
  const bool pools = p.pools();
  for (int i = 0; i < rank; ++i) {
    Axis& a = p.axis[i];
    a.pooled = pools ? pooled_len(a.size, pool, a.kernel, a.factor) : a.size;
  }
  for (int i = 0; i < 2 + rank; ++i) p.xs[i] = x_strides[i];
  for (int i = 0; i < 1 + rank; ++i) p.ls[i] = l_strides[i];
  p.pool = pool;
  p.mode = mode;
  p.ignore_index = ignore_index;
  return p;
}

// A planar isotropic problem: sizes [N, C, H, W], one radius, factor and kernel for both axes.
inline Problem make_planar_problem(const int64_t sizes[4], const int64_t x_strides[4],
                                   const int64_t l_strides[3], int64_t radius, int64_t factor,
                                   int pool, int64_t kernel, int64_t ignore_index, int mode) {
  const int64_t radii[2] = {radius, radius}, factors[2] = {factor, factor},
                kernels[2] = {kernel, kernel};
  return make_problem(2, sizes, x_strides, l_strides, radii, factors, kernels, pool,
                      ignore_index, mode);
}

}  // namespace rmi
