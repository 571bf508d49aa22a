// One RMI problem: sizes, strides, pooling geometry and option codes of one call, shared by the
// CPU (csrc/cpu) and CUDA (csrc/cuda) kernels. Torch-free, like rmi_math.h; the torch-side
// checks that build it are in rmi_ops.h.
#pragma once

#include <cstdint>

#include "rmi_math.h"

namespace rmi {

constexpr int64_t kMaxRadius = 10;  // region side R is in [1, kMaxRadius]

// Sizes and strides are in elements; every index is int64_t.
struct Problem {
  int64_t N, C, H, W;   // logits [N, C, H, W]
  int64_t h, w;         // pooled maps [N, C, h, w]
  int64_t xs[4];        // logits strides
  int64_t ls[3];        // labels strides
  int64_t radius;       // region side R
  int64_t d;            // R * R, the length of a region vector
  int64_t factor;       // downsampling factor s (the `stride` option)
  int64_t kernel;       // pool kernel k, padding k / 2
  int pool;             // PoolKind
  int mode;             // LossMode
  int64_t ignore_index;
};

inline Problem make_problem(const int64_t sizes[4], const int64_t x_strides[4],
                            const int64_t l_strides[3], int64_t radius, int64_t factor, int pool,
                            int64_t kernel, int64_t ignore_index, int mode) {
  Problem p;
  p.N = sizes[0];
  p.C = sizes[1];
  p.H = sizes[2];
  p.W = sizes[3];
  p.h = pooled_len(p.H, pool, kernel, factor);
  p.w = pooled_len(p.W, pool, kernel, factor);
  for (int i = 0; i < 4; ++i) p.xs[i] = x_strides[i];
  for (int i = 0; i < 3; ++i) p.ls[i] = l_strides[i];
  p.radius = radius;
  p.d = radius * radius;
  p.factor = factor;
  p.kernel = kernel;
  p.pool = pool;
  p.mode = mode;
  p.ignore_index = ignore_index;
  return p;
}

}  // namespace rmi
