// Host emulation of the CUDA kernels of csrc/cuda/rmi_kernels.cuh: runs the same per-element
// functions (`*_at`, `*_store`) on the CPU, in the kernels' plans (same Problem, MomentPlan
// chunks and tiles, finalize, BackwardPlan blocks of planes), so tests/test_cuda.py can check
// their math and indexing against the reference without a GPU. What it cannot check: the
// grid-stride loops, the block reductions, the synchronisation of the shared-memory tiles and
// the launches (rmi_cuda.cu).
//
// Build: nvcc -std=c++17 -I csrc csrc/cuda/check/emulate.cu -o emulate
// Usage:
//   emulate IN OUT   IN: kHeaderWords int64 words (see Field), the logits' storage, the target's
//     storage (integer labels, or a float target), a float target's contiguous mask (bool
//     bytes, if any) and, for the backward, base_scale (1 double), coef [N, C, 2, d, d] and shift
//     [N, C, d] (doubles). OUT (doubles): forward: base_sum, base_count, nonfinite, means
//     [N, C, 2, d], cov [N, C, 3, d, d]; backward: grad_logits [N, C, H, W] (logical order).
//   emulate --plan N C H W RADIUS STRIDE POOL POOL_SIZE [LOGIT_BYTES]   (POOL: 0 avg, 1 max,
//     2 interp; LOGIT_BYTES default 4) prints the launch plans of that problem (no data: any
//     size), one launch a line, "name grid.x grid.y grid.z elements", then "moments entries
//     chunks rows_per_chunk window_rows tile_rows tile_cols", "memory partials_bytes
//     scratch_bytes logits_bytes", "backward images channels blocks scratch_planes", and
//     "decode ok|FAIL" (FastDivmod decoding of the last and of sampled elements of every flat
//     index space against plain division, blocks' local spaces included).
//   emulate --taps N_IN N_OUT [N_IN N_OUT ...]   prints the interp taps of those axes (see taps).
//   emulate --selftest   FastDivmod against plain 64-bit division on edge and random values,
//     and the kernels' precomputed interp scales against the per-call ones.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#include "cuda/rmi_kernels.cuh"

namespace {

using namespace rmi::cuda;
using rmi::make_planar_problem;
using rmi::Problem;

enum Field {
  kOp,          // 0 forward_stats, 1 backward_grad
  kDtype,       // logits: 0 float32, 1 float64, 2 float16, 3 bfloat16
  kLabelDtype,  // labels 0 uint8, 1 int32, 2 int64; a float target 3 of the logits' dtype,
                //   4 of the compute type (float32, or float64 beside float64 logits), 5 of the
                //   compute type in mode "region" (a RegionTarget)
  kN, kC, kH, kW,
  kXStride0,    // 4 logits strides
  kXStorage = kXStride0 + 4,  // elements in the logits' storage
  kLStride0,    // 3 label strides (a float target: its N, H, W strides)
  kLStorage = kLStride0 + 3,
  kRadius, kStride, kPool, kPoolSize, kIgnoreIndex, kMode,
  kChannelsLastOut,  // gradient written channels-last (NHWC strides, NHWC visiting order)
  kMaxBlockPlanes,   // backward: cap of the planes of a block (0: plan_backward's choice)
  kTargetCStride,    // a float target's class stride
  kMaskBytes,        // a float target's contiguous mask [N, H, W], 0 without a mask
  kHeaderWords
};

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "emulate: %s\n", what);
  std::exit(2);
}

template <typename T>
std::vector<T> read_array(std::FILE* f, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  if (n > 0 && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) fail("short input");
  return v;
}

void write_doubles(std::FILE* f, const std::vector<double>& v) {
  if (!v.empty() && std::fwrite(v.data(), sizeof(double), v.size(), f) != v.size())
    fail("short write");
}

template <typename T>
double to_double(T v) {
  return static_cast<double>(v);
}
double to_double(__half v) { return static_cast<double>(static_cast<float>(v)); }
double to_double(__nv_bfloat16 v) { return static_cast<double>(static_cast<float>(v)); }

template <typename scalar_t, typename acc_t, typename Target>
std::vector<double> forward_stats(const Problem& g, const scalar_t* x, const Target& target) {
  const int64_t planes = g.N * g.C, plane_size = g.h() * g.w(), d = g.radius() * g.radius();
  const int64_t R = g.radius(), nw = g.w() - R + 1;
  const Divisors dv = make_divisors(g);
  const LaunchPlan launch = plan_launches(g);
  // (a) first term: first_term_kernel + first_term_final_kernel
  FirstTermSums total = {0.0, 0.0, 0};
  for (int64_t q = 0; q < g.N * g.H() * g.W(); ++q) {
    FirstTermSums s = first_term_at<acc_t>(q, x, target, g, dv);
    total.sum += s.sum;
    total.count += s.count;
    total.nonfinite += s.nonfinite;
  }
  const MomentPlan& plan = launch.moments;
  std::vector<double> offsets(2 * planes);
  std::vector<double> partials(planes * plan.chunks * plan.entries);
  dispatch_pool_kind(pooled_kind(g), [&](auto kind) {
    constexpr int k = decltype(kind)::value;
    // (b) moment_sums_offsets_kernel: pooled means from the logits
    for (int64_t plane = 0; plane < planes; ++plane) {
      const PY<double> sum = plane_sums_at<k, acc_t>(plane, 0, 1, x, target, g, dv);
      offsets[2 * plane] = sum.y / static_cast<double>(plane_size);
      offsets[2 * plane + 1] = sum.p / static_cast<double>(plane_size);
    }
    // (b) moment_sums_partials_kernel: every (plane, chunk) walks its tiles in the kernel's order;
    // a tile is staged (all its pixels, NaN elsewhere: a read of an unstaged pixel shows), then
    // every entry adds its products over the tile's windows.
    std::vector<double> tile(2 * kTileElems), acc(plan.entries);
    std::vector<EntryTaps> taps(plan.entries);
    for (int64_t e = 0; e < plan.entries; ++e) taps[e] = entry_taps(moment_entry(e, d), plan, R);
    for (int64_t plane = 0; plane < planes; ++plane) {
      int64_t c;
      const int64_t n = dv.C.divmod(plane, &c);
      for (int64_t chunk = 0; chunk < plan.chunks; ++chunk) {
        const ChunkTiles ct = chunk_tiles(g, plan, chunk);
        std::fill(acc.begin(), acc.end(), 0.0);
        int64_t windows = 0;
        for (int64_t t = 0; t < ct.count; ++t) {
          const MomentTile tl = moment_tile(ct, t, plan, R);
          const int rows = tile_rows_of(tl, R), cols = tile_cols_of(tl, R);
          if (tl.a0 >= tl.a1 || tl.b0 >= tl.b1 || rows > plan.tile_rows ||
              cols > plan.tile_cols || plan.tile_rows * plan.tile_cols > kTileElems)
            fail("tile outside the plan's");
          windows += (tl.a1 - tl.a0) * (tl.b1 - tl.b0);
          std::fill(tile.begin(), tile.end(), std::nan(""));
          for (int idx = 0; idx < rows * cols; ++idx)
            moment_stage_at<k, acc_t>(idx, tl, n, c, offsets[2 * plane], offsets[2 * plane + 1],
                                      x, target, g, dv, plan, tile.data());
          for (int64_t e = 0; e < plan.entries; ++e)
            acc[e] = moment_tile_accumulate(acc[e], taps[e], tl, tile.data(), plan);
        }
        if (windows != (ct.a_end - ct.a_begin) * nw) fail("tiles do not cover the chunk");
        std::copy(acc.begin(), acc.end(),
                  partials.begin() + (plane * plan.chunks + chunk) * plan.entries);
      }
    }
  });
  // (b) moment_sums_finalize_kernel
  std::vector<double> means(planes * 2 * d), cov(planes * 3 * d * d);
  for (int64_t q = 0; q < planes * d * d; ++q)
    moment_sums_finalize_at(q, partials.data(), offsets.data(), g, plan, means.data(), cov.data());
  std::vector<double> out = {total.sum, total.count, static_cast<double>(total.nonfinite)};
  out.insert(out.end(), means.begin(), means.end());
  out.insert(out.end(), cov.begin(), cov.end());
  return out;
}

template <typename scalar_t, typename acc_t, typename Target>
std::vector<double> backward_grad(const int64_t* hd, const Problem& g, const scalar_t* x,
                                  const Target& target, std::FILE* in) {
  const int64_t planes = g.N * g.C, plane_size = g.h() * g.w(), d = g.radius() * g.radius();
  const std::vector<double> base_scale = read_array<double>(in, 1);
  const std::vector<double> coef = read_array<double>(in, planes * 2 * d * d);
  const std::vector<double> shift = read_array<double>(in, planes * d);
  const Divisors dv = make_divisors(g);
  // softmax mode: first_term_lse_kernel ([N, H, W], or [2, N, H, W] for a float target)
  std::vector<acc_t> lse;
  if (g.mode == rmi::kSoftmaxMode) {
    lse.resize(g.N * g.H() * g.W() * (Target::kFloat ? 2 : 1));
    for (int64_t q = 0; q < g.N * g.H() * g.W(); ++q)
      first_term_lse_store<acc_t>(q, x, target, g, dv, lse.data());
  }
  // Output strides as rmi_cuda.cu gets them from empty_like.
  OutStrides os;
  os.channels_last = hd[kChannelsLastOut] != 0;
  if (os.channels_last) {
    os.s[0] = g.C * g.H() * g.W(), os.s[1] = 1, os.s[2] = g.W() * g.C, os.s[3] = g.C;
  } else {
    os.s[0] = g.C * g.H() * g.W(), os.s[1] = g.H() * g.W(), os.s[2] = g.W(), os.s[3] = 1;
  }
  const int64_t numel = g.N * g.C * g.H() * g.W();
  // Unwritten elements stay NaN: a block that misses an element shows.
  std::vector<scalar_t> grad(numel, static_cast<scalar_t>(std::nanf("")));
  const bool records_argmax = g.pool == rmi::kMaxPool && g.factor() > 1;
  const BackwardPlan bp = plan_backward(g, sizeof(scalar_t), sizeof(acc_t), records_argmax,
                                        hd[kMaxBlockPlanes]);
  const acc_t* lse_ptr = lse.empty() ? nullptr : lse.data();
  if (g.factor() == 1) {
    // full_res_grad_kernel<..., fused = true> over one block of every plane
    if (bp.blocks != 1 || bp.scratch_planes != 0) fail("factor 1 must run as one fused block");
    const PlaneBlock blk = block_of(g, bp, 0);
    for (int64_t q = 0; q < blk.images * blk.channels * g.H() * g.W(); ++q)
      full_res_grad_store<true, acc_t>(q, x, target, g, dv, blk, coef.data(), shift.data(),
                                       static_cast<const acc_t*>(nullptr), nullptr, lse_ptr,
                                       base_scale.data(), grad.data(), os);
  } else {
    // Per block of planes: pooled_maps_kernel (with the max-pooling arg-max as rmi_cuda.cu
    // records it), pooled_grad_stencil_kernel, full_res_grad_kernel<..., fused = false>, on
    // scratch of bp.scratch_planes planes reused by every block (filled with NaN / -1 before
    // each block, so a read of another block's or an unwritten element shows).
    const int64_t scratch = bp.scratch_planes * plane_size;
    std::vector<acc_t> y(scratch), p(scratch), grad_pooled(scratch);
    std::vector<int32_t> argmax(records_argmax ? scratch : 0);
    int64_t covered = 0;
    for (int64_t k = 0; k < bp.blocks; ++k) {
      const PlaneBlock blk = block_of(g, bp, k);
      const int64_t block_planes = blk.images * blk.channels;
      if (block_planes > bp.scratch_planes) fail("block larger than its scratch");
      covered += block_planes;
      const acc_t nan = static_cast<acc_t>(std::nan(""));
      std::fill(y.begin(), y.end(), nan);
      std::fill(p.begin(), p.end(), nan);
      std::fill(grad_pooled.begin(), grad_pooled.end(), nan);
      std::fill(argmax.begin(), argmax.end(), -1);
      int32_t* arg = records_argmax ? argmax.data() : nullptr;
      dispatch_pool_kind(pooled_kind(g), [&](auto kind) {
        for (int64_t q = 0; q < block_planes * plane_size; ++q)
          pooled_maps_store<decltype(kind)::value, acc_t>(q, x, target, g, dv, blk, y.data(),
                                                          p.data(), arg);
      });
      for (int64_t q = 0; q < block_planes * plane_size; ++q)
        pooled_grad_stencil_store(q, y.data(), p.data(), coef.data(), shift.data(), g, dv, blk,
                                  grad_pooled.data());
      for (int64_t q = 0; q < block_planes * g.H() * g.W(); ++q)
        full_res_grad_store<false, acc_t>(q, x, target, g, dv, blk, coef.data(), shift.data(),
                                          grad_pooled.data(), arg, lse_ptr, base_scale.data(),
                                          grad.data(), os);
    }
    if (covered != planes) fail("the blocks do not cover every plane once");
  }
  std::vector<double> out(numel);  // logical [N, C, H, W] order
  for (int64_t n = 0, q = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t h = 0; h < g.H(); ++h)
        for (int64_t w = 0; w < g.W(); ++w, ++q)
          out[q] = to_double(grad[n * os.s[0] + c * os.s[1] + h * os.s[2] + w * os.s[3]]);
  return out;
}

template <typename scalar_t, typename acc_t, typename Target>
std::vector<double> run_target(const int64_t* hd, const scalar_t* x, const Target& target,
                               std::FILE* in) {
  const int64_t sizes[4] = {hd[kN], hd[kC], hd[kH], hd[kW]};
  const Problem g = make_planar_problem(sizes, hd + kXStride0, hd + kLStride0, hd[kRadius],
                                        hd[kStride], static_cast<int>(hd[kPool]), hd[kPoolSize],
                                        hd[kIgnoreIndex], static_cast<int>(hd[kMode]));
  if (g.h() < g.radius() || g.w() < g.radius()) fail("pooled map smaller than the region");
  if ((g.mode == rmi::kRegionMode) != Target::kRegion)
    fail("mode region goes with a region target, and only with it");
  if (hd[kOp] == 0) return forward_stats<scalar_t, acc_t>(g, x, target);
  return backward_grad<scalar_t, acc_t>(hd, g, x, target, in);
}

// The target's storage as the glue passes it (rmi_cuda.cu dispatch_target): integer labels,
// or a float target of element type value_t and its mask.
template <typename scalar_t, typename acc_t, typename value_t>
std::vector<double> run(const int64_t* hd, std::FILE* in) {
  const std::vector<scalar_t> x = read_array<scalar_t>(in, hd[kXStorage]);
  const std::vector<value_t> values = read_array<value_t>(in, hd[kLStorage]);
  if constexpr (std::is_integral<value_t>::value) {
    return run_target<scalar_t, acc_t>(hd, x.data(), LabelTarget<value_t>{values.data()}, in);
  } else {
    const std::vector<uint8_t> mask_bytes = read_array<uint8_t>(in, hd[kMaskBytes]);
    std::unique_ptr<bool[]> mask(new bool[mask_bytes.size() + 1]);
    for (size_t i = 0; i < mask_bytes.size(); ++i) mask[i] = mask_bytes[i] != 0;
    const FloatTarget<value_t> target = {values.data(), hd[kTargetCStride],
                                         mask_bytes.empty() ? nullptr : mask.get()};
    if (hd[kLabelDtype] == 5) {
      if constexpr (std::is_same<value_t, acc_t>::value)
        return run_target<scalar_t, acc_t>(hd, x.data(), RegionTarget<acc_t>{target}, in);
      fail("a region target must be in the compute type");
    }
    return run_target<scalar_t, acc_t>(hd, x.data(), target, in);
  }
}

template <typename scalar_t, typename acc_t>
std::vector<double> run_labels(const int64_t* hd, std::FILE* in) {
  switch (hd[kLabelDtype]) {
    case 0: return run<scalar_t, acc_t, uint8_t>(hd, in);
    case 1: return run<scalar_t, acc_t, int32_t>(hd, in);
    case 2: return run<scalar_t, acc_t, int64_t>(hd, in);
    case 3: return run<scalar_t, acc_t, scalar_t>(hd, in);
    case 4:
    case 5: return run<scalar_t, acc_t, acc_t>(hd, in);
  }
  fail("unknown label dtype");
}

// ---- --selftest: FastDivmod ----------------------------------------------------------------

int64_t selftest_failures = 0;

void check_divmod(const FastDivmod& f, int64_t n) {
  int64_t rem = -1;
  const int64_t q = f.divmod(n, &rem);
  if (q != n / f.divisor || rem != n % f.divisor) {
    if (++selftest_failures <= 10)
      std::printf("FastDivmod: %lld / %lld gave %lld rem %lld, want %lld rem %lld\n",
                  static_cast<long long>(n), static_cast<long long>(f.divisor),
                  static_cast<long long>(q), static_cast<long long>(rem),
                  static_cast<long long>(n / f.divisor), static_cast<long long>(n % f.divisor));
  }
}

// The interp taps with the scales the kernels precompute (make_divisors: AxisScales) against
// the rmi_math.h overloads that compute the scale per call, bit for bit (torch's own taps are
// compared with the kernels' by --taps in tests/test_cuda.py).
template <typename T>
bool same_tap(const rmi::LinearTap<T>& a, const rmi::LinearTap<T>& b) {
  return a.i0 == b.i0 && a.i1 == b.i1 && std::memcmp(&a.w0, &b.w0, sizeof(T)) == 0 &&
         std::memcmp(&a.w1, &b.w1, sizeof(T)) == 0;
}

int64_t check_interp_scales() {
  int64_t checks = 0;
  std::vector<std::pair<int64_t, int64_t>> sizes;  // (n_in, n_out)
  for (int64_t n_in = 1; n_in <= 80; ++n_in)
    for (int64_t s = 1; s <= 8; ++s) sizes.push_back({n_in, n_in / s > 0 ? n_in / s : 1});
  for (int64_t n_in : {513, 1000, 1023, 4097, 100003})
    for (int64_t s = 1; s <= 16; ++s) sizes.push_back({n_in, n_in / s});
  for (const auto& nn : sizes) {
    const int64_t n_in = nn.first, n_out = nn.second;
    const rmi::cuda::AxisScales sc = make_axis_scales(n_in, n_out);
    for (int64_t o = 0; o < n_out; ++o, ++checks) {
      const bool ok =
          rmi::nearest_source(o, n_in, n_out, sc.nearest) == rmi::nearest_source(o, n_in, n_out) &&
          same_tap(rmi::linear_tap<float>(o, n_in, sc.linear<float>()),
                   rmi::linear_tap<float>(o, n_in, n_out)) &&
          same_tap(rmi::linear_tap<double>(o, n_in, sc.linear<double>()),
                   rmi::linear_tap<double>(o, n_in, n_out));
      if (!ok && ++selftest_failures <= 10)
        std::printf("interp taps differ: o %lld, n_in %lld, n_out %lld\n",
                    static_cast<long long>(o), static_cast<long long>(n_in),
                    static_cast<long long>(n_out));
    }
  }
  return checks;
}

int selftest() {
  const int64_t max = INT64_MAX;
  std::mt19937_64 rng(20240607);
  std::vector<int64_t> divisors;
  for (int64_t d = 1; d <= 4096; ++d) divisors.push_back(d);
  for (int s = 12; s < 63; ++s) {  // powers of two and their neighbours
    const int64_t p = int64_t(1) << s;
    divisors.insert(divisors.end(), {p - 1, p, p + 1, p + p / 2, p + p / 2 + 1});
  }
  divisors.insert(divisors.end(), {1000003, 2147483647, 2147483648LL, 4294967295LL,
                                   4294967296LL, 4294967297LL, 150 * 1024 * 1024LL, max - 1,
                                   max});
  for (int i = 0; i < 2000; ++i) {  // random divisors of every magnitude
    const int bits = 1 + static_cast<int>(rng() % 63);
    const int64_t d = static_cast<int64_t>(rng() >> (64 - bits));
    if (d >= 1) divisors.push_back(d);
  }
  int64_t checks = 0;
  for (int64_t d : divisors) {
    const FastDivmod f = make_fast_divmod(d);
    std::vector<int64_t> values = {0, 1, 2, d - 1, d, max, max - 1, max - d + 1};
    if (d <= max / 2) values.insert(values.end(), {d + 1, 2 * d - 1, 2 * d});
    const int64_t top = (max / d) * d;  // the largest multiple of d, and its neighbours
    values.insert(values.end(), {top, top - 1, top - d, top - d + 1});
    for (int i = 0; i < 200; ++i) {
      const int bits = 1 + static_cast<int>(rng() % 63);
      values.push_back(static_cast<int64_t>(rng() >> (64 - bits)));
    }
    for (int64_t n : values)
      if (n >= 0) check_divmod(f, n), ++checks;
  }
  for (int64_t n = 0; n < (int64_t(1) << 16); ++n)  // dense small range, small divisors
    for (int64_t d = 1; d <= 40; ++d) check_divmod(make_fast_divmod(d), n), ++checks;
  for (int i = 0; i < 100000; ++i) {  // the portable multiply-high against the native one
    const uint64_t a = rng(), b = rng();
    if (mulhi_u64_parts(a, b) != mulhi_u64(a, b) && ++selftest_failures <= 10)
      std::printf("mulhi_u64_parts(%llu, %llu) is wrong\n", static_cast<unsigned long long>(a),
                  static_cast<unsigned long long>(b));
  }
  checks += check_interp_scales();
  std::printf("selftest: %lld divisions, %lld failures\n", static_cast<long long>(checks),
              static_cast<long long>(selftest_failures));
  return selftest_failures == 0 ? 0 : 1;
}

// ---- --taps: the interp taps the kernels use ------------------------------------------------

// For each pair (n_in, n_out) of argv: a line "axis n_in n_out", then per output index o the
// nearest source and the bilinear (align_corners=True) taps in float and in double, with the
// scales the kernels precompute (AxisScales): "o nearest i0 i1 w0 w1 i0 i1 w0 w1", weights in
// hexadecimal (%a, exact). tests/test_cuda.py compares them with F.interpolate.
int taps(int argc, char** argv) {
  auto ll = [](int64_t x) { return static_cast<long long>(x); };
  for (int i = 0; i + 1 < argc; i += 2) {
    const int64_t n_in = std::strtoll(argv[i], nullptr, 10);
    const int64_t n_out = std::strtoll(argv[i + 1], nullptr, 10);
    if (n_in < 1 || n_out < 1) fail("--taps: sizes must be positive");
    const AxisScales sc = make_axis_scales(n_in, n_out);
    std::printf("axis %lld %lld\n", ll(n_in), ll(n_out));
    for (int64_t o = 0; o < n_out; ++o) {
      const rmi::LinearTap<float> f = rmi::linear_tap<float>(o, n_in, sc.linear<float>());
      const rmi::LinearTap<double> d = rmi::linear_tap<double>(o, n_in, sc.linear<double>());
      std::printf("%lld %lld %lld %lld %a %a %lld %lld %a %a\n", ll(o),
                  ll(rmi::nearest_source(o, n_in, n_out, sc.nearest)), ll(f.i0), ll(f.i1),
                  static_cast<double>(f.w0), static_cast<double>(f.w1), ll(d.i0), ll(d.i1), d.w0,
                  d.w1);
    }
  }
  return 0;
}

// ---- --plan: launch plan and index decoding at any size ----------------------------------------

// Decodes flat index q of sizes [s0, s1, s2, s3] (last fastest) with the divisors f1..f3 of
// s1..s3 as the kernels do, against plain division.
bool decode_ok(int64_t q, const int64_t s[4], const FastDivmod* const f[4]) {
  int64_t got[4], rem = q;
  for (int i = 3; i >= 1; --i) rem = f[i]->divmod(rem, &got[i]);
  got[0] = rem;
  int64_t want[4];
  rem = q;
  for (int i = 3; i >= 1; --i) want[i] = rem % s[i], rem /= s[i];
  want[0] = rem;
  for (int i = 0; i < 4; ++i)
    if (got[i] != want[i]) return false;
  return got[0] < s[0];
}

bool decode_space_ok(const int64_t s[4], const FastDivmod* const f[4], std::mt19937_64& rng) {
  const int64_t numel = s[0] * s[1] * s[2] * s[3];
  bool ok = true;
  for (int64_t q : {int64_t(0), numel - 1, numel / 2, numel - s[3], numel - s[2] * s[3]})
    if (q >= 0) ok = ok && decode_ok(q, s, f);
  for (int i = 0; i < 100000; ++i)
    ok = ok && decode_ok(static_cast<int64_t>(rng() % static_cast<uint64_t>(numel)), s, f);
  return ok;
}

int plan(int argc, char** argv) {
  int64_t v[9] = {0, 0, 0, 0, 0, 0, 0, 0, 4};
  for (int i = 0; i < argc; ++i) v[i] = std::strtoll(argv[i], nullptr, 10);
  const int64_t logit_bytes = v[8], acc_bytes = logit_bytes == 8 ? 8 : 4;
  const int64_t sizes[4] = {v[0], v[1], v[2], v[3]};
  const int64_t x_strides[4] = {v[1] * v[2] * v[3], v[2] * v[3], v[3], 1};
  const int64_t l_strides[3] = {v[2] * v[3], v[3], 1};
  const Problem g = make_planar_problem(sizes, x_strides, l_strides, v[4], v[5],
                                        static_cast<int>(v[6]), v[7], 255, rmi::kSigmoidMode);
  if (g.h() < g.radius() || g.w() < g.radius()) fail("pooled map smaller than the region");
  const LaunchPlan lp = plan_launches(g);
  const BackwardPlan bp =
      plan_backward(g, logit_bytes, acc_bytes, g.pool == rmi::kMaxPool && g.factor() > 1);
  const int64_t planes = g.N * g.C, block_planes = bp.images * bp.channels;
  auto ll = [](int64_t x) { return static_cast<long long>(x); };
  std::printf("first_term %u 1 1 %lld\n", lp.first_term_blocks, ll(g.N * g.H() * g.W()));
  std::printf("first_term_lse %u 1 1 %lld\n", lp.pixel_blocks, ll(g.N * g.H() * g.W()));
  if (g.factor() > 1) {
    std::printf("pooled_maps %u 1 1 %lld\n", bp.pooled_blocks, ll(block_planes * g.h() * g.w()));
    std::printf("pooled_grad_stencil %u 1 1 %lld\n", bp.pooled_blocks,
                ll(block_planes * g.h() * g.w()));
  }
  std::printf("full_res_grad %u 1 1 %lld\n", bp.full_blocks, ll(block_planes * g.H() * g.W()));
  std::printf("moment_sums_offsets %u 1 1 %lld\n", lp.plane_blocks, ll(planes));
  std::printf("moment_sums_finalize %u 1 1 %lld\n", lp.finalize_blocks, ll(planes * g.d * g.d));
  std::printf("moment_sums_partials %u %u %u %lld\n", lp.moment_grid.x, lp.moment_grid.y,
              lp.moment_grid.z, ll(planes));
  const MomentPlan& m = lp.moments;
  std::printf("moments %lld %lld %lld %lld %lld %lld\n", ll(m.entries), ll(m.chunks),
              ll(m.rows_per_chunk), ll(g.h() - g.radius() + 1), ll(m.tile_rows), ll(m.tile_cols));
  std::printf("memory %lld %lld %lld\n", ll(planes * m.chunks * m.entries * 8),
              ll(bp.scratch_bytes), ll(planes * g.H() * g.W() * logit_bytes));
  std::printf("backward %lld %lld %lld %lld\n", ll(bp.images), ll(bp.channels), ll(bp.blocks),
              ll(bp.scratch_planes));
  // Every block of the backward plan in order: they must tile the planes exactly.
  bool ok = true;
  int64_t next = 0;
  for (int64_t k = 0; k < bp.blocks && ok; ++k) {
    const PlaneBlock blk = block_of(g, bp, k);
    ok = blk.n0 * g.C + blk.c0 == next && blk.images >= 1 && blk.channels >= 1 &&
         blk.images * blk.channels <= block_planes &&
         (blk.channels == g.C || blk.images == 1) && blk.c0 + blk.channels <= g.C &&
         blk.n0 + blk.images <= g.N;
    next += blk.images * blk.channels;
  }
  ok = ok && next == planes;
  std::printf("blocks %s\n", ok ? "ok" : "FAIL");
  // The index spaces the kernels decode: [N, C, H, W] and [N, H, W, C] (full_res_grad of the
  // fused block), [N, H, W] (pixels), [N, C] planes x [h, w] (offsets), and the local spaces of
  // the first and the last backward blocks: [images, channels, H, W], [images, H, W, channels]
  // (full_res_grad), [images, channels, h, w] (pooled maps, stencil).
  const Divisors dv = make_divisors(g);
  std::mt19937_64 rng(7);
  const FastDivmod one = make_fast_divmod(g.N);
  const int64_t pixels[4] = {1, g.N, g.H(), g.W()}, offsets[4] = {1, planes, g.h(), g.w()};
  const FastDivmod* f_pixels[4] = {nullptr, &one, &dv.H, &dv.W};
  const FastDivmod planes_div = make_fast_divmod(planes);
  const FastDivmod* f_offsets[4] = {nullptr, &planes_div, &dv.h, &dv.w};
  ok = decode_space_ok(pixels, f_pixels, rng) && decode_space_ok(offsets, f_offsets, rng);
  for (int64_t k : {int64_t(0), bp.blocks - 1}) {
    const PlaneBlock blk = block_of(g, bp, k);
    const int64_t nchw[4] = {blk.images, blk.channels, g.H(), g.W()};
    const int64_t nhwc[4] = {blk.images, g.H(), g.W(), blk.channels};
    const int64_t pooled[4] = {blk.images, blk.channels, g.h(), g.w()};
    const FastDivmod* f_nchw[4] = {nullptr, &blk.channel_div, &dv.H, &dv.W};
    const FastDivmod* f_nhwc[4] = {nullptr, &dv.H, &dv.W, &blk.channel_div};
    const FastDivmod* f_pooled[4] = {nullptr, &blk.channel_div, &dv.h, &dv.w};
    ok = ok && decode_space_ok(nchw, f_nchw, rng) && decode_space_ok(nhwc, f_nhwc, rng) &&
         decode_space_ok(pooled, f_pooled, rng);
  }
  std::printf("decode %s\n", ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--selftest") == 0) return selftest();
  if ((argc == 10 || argc == 11) && std::strcmp(argv[1], "--plan") == 0)
    return plan(argc - 2, argv + 2);
  if (argc >= 4 && argc % 2 == 0 && std::strcmp(argv[1], "--taps") == 0)
    return taps(argc - 2, argv + 2);
  if (argc != 3)
    fail("usage: emulate IN OUT | --plan N C H W R S POOL K [BYTES] | --taps N_IN N_OUT ... |"
         " --selftest");
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) fail("cannot open IN");
  const std::vector<int64_t> hd = read_array<int64_t>(in, kHeaderWords);
  std::vector<double> out;
  switch (hd[kDtype]) {
    case 0: out = run_labels<float, float>(hd.data(), in); break;
    case 1: out = run_labels<double, double>(hd.data(), in); break;
    case 2: out = run_labels<__half, float>(hd.data(), in); break;
    case 3: out = run_labels<__nv_bfloat16, float>(hd.data(), in); break;
    default: fail("unknown logits dtype");
  }
  std::fclose(in);
  std::FILE* f = std::fopen(argv[2], "wb");
  if (!f) fail("cannot open OUT");
  write_doubles(f, out);
  std::fclose(f);
  return 0;
}
