// Host emulation of the CUDA kernels of csrc/cuda/rmi_kernels.cuh: runs the same per-element
// functions (`*_at`, `*_store`) on the CPU, in the kernels' plan (same Problem, MomentPlan,
// chunks and finalize), so tests/test_cuda.py can check their math and indexing against the
// reference without a GPU. What it cannot check: the grid-stride loops, the block
// reductions and the launches (rmi_cuda.cu).
//
// Build: nvcc -std=c++17 -I csrc csrc/cuda/check/emulate.cu -o emulate
// Usage:
//   emulate IN OUT   IN: kHeaderWords int64 words (see Field), the logits' storage, the labels'
//     storage and, for the backward, base_scale (1 double), coef [N, C, 2, d, d] and shift
//     [N, C, d] (doubles). OUT (doubles): forward: base_sum, base_count, nonfinite, means
//     [N, C, 2, d], cov [N, C, 3, d, d]; backward: grad_logits [N, C, H, W] (logical order).
//   emulate --plan N C H W RADIUS STRIDE POOL POOL_SIZE   (POOL: 0 avg, 1 max, 2 interp)
//     prints plan_launches() of that problem (no data: any size), one launch a line,
//     "name grid.x grid.y grid.z elements", then "moments entries chunks rows_per_chunk
//     window_rows" and "decode ok|FAIL" (FastDivmod decoding of the last and of sampled
//     elements of every flat index space against plain division).
//   emulate --selftest   FastDivmod against plain 64-bit division on edge and random values.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/rmi_kernels.cuh"

namespace {

using namespace rmi::cuda;
using rmi::make_problem;
using rmi::Problem;

enum Field {
  kOp,          // 0 forward_stats, 1 backward_grad
  kDtype,       // logits: 0 float32, 1 float64, 2 float16, 3 bfloat16
  kLabelDtype,  // 0 uint8, 1 int32, 2 int64
  kN, kC, kH, kW,
  kXStride0,    // 4 logits strides
  kXStorage = kXStride0 + 4,  // elements in the logits' storage
  kLStride0,    // 3 label strides
  kLStorage = kLStride0 + 3,
  kRadius, kStride, kPool, kPoolSize, kIgnoreIndex, kMode,
  kChannelsLastOut,  // gradient written channels-last (NHWC strides, NHWC visiting order)
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

template <typename scalar_t, typename acc_t, typename label_t>
std::vector<double> forward_stats(const Problem& g, const scalar_t* x, const label_t* labels) {
  const int64_t planes = g.N * g.C, plane_size = g.h * g.w, d = g.radius * g.radius;
  const Divisors dv = make_divisors(g);
  const LaunchPlan launch = plan_launches(g);
  // (a) first term: base_stats_kernel + base_stats_final_kernel
  BaseStats total = {0.0, 0.0, 0};
  for (int64_t q = 0; q < g.N * g.H * g.W; ++q) {
    BaseStats s = base_stats_at<acc_t>(q, x, labels, g, dv);
    total.sum += s.sum;
    total.count += s.count;
    total.nonfinite += s.nonfinite;
  }
  // (a) pooled maps: pooled_maps_kernel
  std::vector<acc_t> y(planes * plane_size), p(planes * plane_size);
  dispatch_pool_kind(pooled_kind(g), [&](auto kind) {
    for (int64_t q = 0; q < planes * plane_size; ++q)
      pooled_store<decltype(kind)::value, acc_t>(q, x, labels, g, dv, y.data(), p.data(),
                                                 nullptr);
  });
  // (b) plane_offsets_kernel, moment_partials_kernel, moment_finalize_kernel
  std::vector<double> offsets(2 * planes);
  for (int64_t plane = 0; plane < planes; ++plane) {
    double sy = 0.0, sp = 0.0;
    for (int64_t i = 0; i < plane_size; ++i) {
      sy += static_cast<double>(y[plane * plane_size + i]);
      sp += static_cast<double>(p[plane * plane_size + i]);
    }
    offsets[2 * plane] = sy / plane_size;
    offsets[2 * plane + 1] = sp / plane_size;
  }
  const MomentPlan& plan = launch.moments;
  std::vector<double> partials(planes * plan.chunks * plan.entries);
  for (int64_t plane = 0; plane < planes; ++plane)
    for (int64_t chunk = 0; chunk < plan.chunks; ++chunk)
      for (int64_t e = 0; e < plan.entries; ++e)
        partials[(plane * plan.chunks + chunk) * plan.entries + e] =
            moment_partial_at(plane, chunk, e, y.data(), p.data(), offsets.data(), g, plan);
  std::vector<double> means(planes * 2 * d), cov(planes * 3 * d * d);
  for (int64_t q = 0; q < planes * d * d; ++q)
    moment_finalize_at(q, partials.data(), offsets.data(), g, plan, means.data(), cov.data());
  std::vector<double> out = {total.sum, total.count, static_cast<double>(total.nonfinite)};
  out.insert(out.end(), means.begin(), means.end());
  out.insert(out.end(), cov.begin(), cov.end());
  return out;
}

template <typename scalar_t, typename acc_t, typename label_t>
std::vector<double> backward_grad(const int64_t* hd, const Problem& g, const scalar_t* x,
                                  const label_t* labels, std::FILE* in) {
  const int64_t planes = g.N * g.C, plane_size = g.h * g.w, d = g.radius * g.radius;
  const std::vector<double> base_scale = read_array<double>(in, 1);
  const std::vector<double> coef = read_array<double>(in, planes * 2 * d * d);
  const std::vector<double> shift = read_array<double>(in, planes * d);
  const Divisors dv = make_divisors(g);
  // (a) pooled maps again, with the max-pooling arg-max as rmi_cuda.cu records it (max pooling
  // with factor > 1), (d) stencil: pooled_maps_kernel, pooled_grad_kernel
  std::vector<acc_t> y(planes * plane_size), p(planes * plane_size), grad_pooled(y.size());
  const bool records_argmax = g.pool == rmi::kMaxPool && g.factor > 1;
  std::vector<int32_t> argmax(records_argmax ? planes * plane_size : 0, -1);
  dispatch_pool_kind(pooled_kind(g), [&](auto kind) {
    for (int64_t q = 0; q < planes * plane_size; ++q)
      pooled_store<decltype(kind)::value, acc_t>(q, x, labels, g, dv, y.data(), p.data(),
                                                 records_argmax ? argmax.data() : nullptr);
  });
  for (int64_t q = 0; q < planes * plane_size; ++q)
    pooled_grad_store(q, y.data(), p.data(), coef.data(), shift.data(), g, dv,
                      grad_pooled.data());
  // softmax mode: logsumexp_kernel (its index decoding)
  std::vector<acc_t> lse;
  if (g.mode == rmi::kSoftmaxMode) {
    lse.resize(g.N * g.H * g.W);
    for (int64_t q = 0; q < g.N * g.H * g.W; ++q) {
      int64_t xx, yy;
      const int64_t n = dv.H.divmod(dv.W.divmod(q, &xx), &yy);
      lse[q] = logsumexp_at<acc_t>(x, g, n, yy, xx);
    }
  }
  // (e) full_grad_kernel, output strides as rmi_cuda.cu gets them from empty_like
  OutStrides os;
  os.channels_last = hd[kChannelsLastOut] != 0;
  if (os.channels_last) {
    os.s[0] = g.C * g.H * g.W, os.s[1] = 1, os.s[2] = g.W * g.C, os.s[3] = g.C;
  } else {
    os.s[0] = g.C * g.H * g.W, os.s[1] = g.H * g.W, os.s[2] = g.W, os.s[3] = 1;
  }
  const int64_t numel = g.N * g.C * g.H * g.W;
  std::vector<scalar_t> grad(numel);
  for (int64_t q = 0; q < numel; ++q)
    full_grad_store<acc_t>(q, x, labels, g, dv, grad_pooled.data(),
                           records_argmax ? argmax.data() : nullptr,
                           lse.empty() ? nullptr : lse.data(), base_scale.data(), grad.data(), os);
  std::vector<double> out(numel);  // logical [N, C, H, W] order
  for (int64_t n = 0, q = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w = 0; w < g.W; ++w, ++q)
          out[q] = to_double(grad[n * os.s[0] + c * os.s[1] + h * os.s[2] + w * os.s[3]]);
  return out;
}

template <typename scalar_t, typename acc_t, typename label_t>
std::vector<double> run(const int64_t* hd, std::FILE* in) {
  const std::vector<scalar_t> x = read_array<scalar_t>(in, hd[kXStorage]);
  const std::vector<label_t> labels = read_array<label_t>(in, hd[kLStorage]);
  const int64_t sizes[4] = {hd[kN], hd[kC], hd[kH], hd[kW]};
  const Problem g = make_problem(sizes, hd + kXStride0, hd + kLStride0, hd[kRadius],
                                 hd[kStride], static_cast<int>(hd[kPool]), hd[kPoolSize],
                                 hd[kIgnoreIndex], static_cast<int>(hd[kMode]));
  if (g.h < g.radius || g.w < g.radius) fail("pooled map smaller than the region");
  if (hd[kOp] == 0) return forward_stats<scalar_t, acc_t, label_t>(g, x.data(), labels.data());
  return backward_grad<scalar_t, acc_t, label_t>(hd, g, x.data(), labels.data(), in);
}

template <typename scalar_t, typename acc_t>
std::vector<double> run_labels(const int64_t* hd, std::FILE* in) {
  switch (hd[kLabelDtype]) {
    case 0: return run<scalar_t, acc_t, uint8_t>(hd, in);
    case 1: return run<scalar_t, acc_t, int32_t>(hd, in);
    case 2: return run<scalar_t, acc_t, int64_t>(hd, in);
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
  std::printf("selftest: %lld divisions, %lld failures\n", static_cast<long long>(checks),
              static_cast<long long>(selftest_failures));
  return selftest_failures == 0 ? 0 : 1;
}

// ---- --plan: launch plan and index decoding at any size ----------------------------------------

// Decodes flat index q of sizes [s0, s1, s2, s3] (last fastest) with the divisors f1..f3 of
// s1..s3 as the kernels do, against plain division.
bool decode_ok(int64_t q, const int64_t s[4], const FastDivmod* f[4]) {
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

int plan(char** argv) {
  int64_t v[8];
  for (int i = 0; i < 8; ++i) v[i] = std::strtoll(argv[i], nullptr, 10);
  const int64_t sizes[4] = {v[0], v[1], v[2], v[3]};
  const int64_t x_strides[4] = {v[1] * v[2] * v[3], v[2] * v[3], v[3], 1};
  const int64_t l_strides[3] = {v[2] * v[3], v[3], 1};
  const Problem g = make_problem(sizes, x_strides, l_strides, v[4], v[5], static_cast<int>(v[6]),
                                 v[7], 255, rmi::kSigmoidMode);
  if (g.h < g.radius || g.w < g.radius) fail("pooled map smaller than the region");
  const LaunchPlan lp = plan_launches(g);
  const int64_t planes = g.N * g.C;
  std::printf("base_stats %u 1 1 %lld\n", lp.stats_blocks,
              static_cast<long long>(g.N * g.H * g.W));
  std::printf("logsumexp %u 1 1 %lld\n", lp.pixel_blocks, static_cast<long long>(g.N * g.H * g.W));
  std::printf("pooled_maps %u 1 1 %lld\n", lp.pooled_blocks,
              static_cast<long long>(planes * g.h * g.w));
  std::printf("pooled_grad %u 1 1 %lld\n", lp.pooled_blocks,
              static_cast<long long>(planes * g.h * g.w));
  std::printf("full_grad %u 1 1 %lld\n", lp.full_blocks,
              static_cast<long long>(planes * g.H * g.W));
  std::printf("plane_offsets %u 1 1 %lld\n", lp.plane_blocks, static_cast<long long>(planes));
  std::printf("moment_finalize %u 1 1 %lld\n", lp.finalize_blocks,
              static_cast<long long>(planes * g.d * g.d));
  std::printf("moment_partials %u %u %u %lld\n", lp.moment_grid.x, lp.moment_grid.y,
              lp.moment_grid.z, static_cast<long long>(planes));
  std::printf("moments %lld %lld %lld %lld\n", static_cast<long long>(lp.moments.entries),
              static_cast<long long>(lp.moments.chunks),
              static_cast<long long>(lp.moments.rows_per_chunk),
              static_cast<long long>(g.h - g.radius + 1));
  // The index spaces the kernels decode: [N, C, H, W] (full_grad, NCHW), [N, H, W, C]
  // (full_grad, channels last), [N, C, h, w] (pooled maps, stencil), [1, N, H, W] (pixels).
  const Divisors dv = make_divisors(g);
  const int64_t nchw[4] = {g.N, g.C, g.H, g.W}, nhwc[4] = {g.N, g.H, g.W, g.C};
  const int64_t pooled[4] = {g.N, g.C, g.h, g.w}, pixels[4] = {1, g.N, g.H, g.W};
  const FastDivmod* f_nchw[4] = {nullptr, &dv.C, &dv.H, &dv.W};
  const FastDivmod* f_nhwc[4] = {nullptr, &dv.H, &dv.W, &dv.C};
  const FastDivmod* f_pooled[4] = {nullptr, &dv.C, &dv.h, &dv.w};
  const FastDivmod one = make_fast_divmod(g.N);
  const FastDivmod* f_pixels[4] = {nullptr, &one, &dv.H, &dv.W};
  const int64_t* spaces[4] = {nchw, nhwc, pooled, pixels};
  const FastDivmod* const* divs[4] = {f_nchw, f_nhwc, f_pooled, f_pixels};
  std::mt19937_64 rng(7);
  bool ok = true;
  for (int k = 0; k < 4; ++k) {
    const int64_t* s = spaces[k];
    const int64_t numel = s[0] * s[1] * s[2] * s[3];
    const FastDivmod* f[4] = {divs[k][0], divs[k][1], divs[k][2], divs[k][3]};
    for (int64_t q : {int64_t(0), numel - 1, numel / 2, numel - s[3], numel - s[2] * s[3]})
      if (q >= 0) ok = ok && decode_ok(q, s, f);
    for (int i = 0; i < 100000; ++i)
      ok = ok && decode_ok(static_cast<int64_t>(rng() % static_cast<uint64_t>(numel)), s, f);
  }
  std::printf("decode %s\n", ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--selftest") == 0) return selftest();
  if (argc == 10 && std::strcmp(argv[1], "--plan") == 0) return plan(argv + 2);
  if (argc != 3) fail("usage: emulate IN OUT | --plan N C H W R S POOL K | --selftest");
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
