// Host emulation of the CUDA kernels of csrc/cuda/rmi_kernels.cuh: runs the same per-element
// functions (`*_at`, `*_store`) on the CPU, in the kernels' plan (same Problem, MomentPlan,
// chunks and finalize), so tests/test_cuda.py can check their math and indexing against the
// reference without a GPU. What it cannot check: the grid-stride loops, the block
// reductions and the launches (rmi_cuda.cu).
//
// Build: nvcc -std=c++17 -I csrc csrc/cuda/check/emulate.cu -o emulate
// Usage: emulate IN OUT. IN: kHeaderWords int64 words (see Field), the logits' storage, the
// labels' storage and, for the backward, base_scale (1 double), coef [N, C, 2, d, d] and
// shift [N, C, d] (doubles). OUT (doubles): forward: base_sum, base_count, nonfinite, means
// [N, C, 2, d], cov [N, C, 3, d, d]; backward: grad_logits [N, C, H, W] (logical order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/rmi_kernels.cuh"

namespace {

using namespace rmi::cuda;

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
  // (a) first term: base_stats_kernel + base_stats_final_kernel
  BaseStats total = {0.0, 0.0, 0};
  for (int64_t q = 0; q < g.N * g.H * g.W; ++q) {
    BaseStats s = base_stats_at<acc_t>(q, x, labels, g);
    total.sum += s.sum;
    total.count += s.count;
    total.nonfinite += s.nonfinite;
  }
  // (a) pooled maps: pooled_maps_kernel
  std::vector<acc_t> y(planes * plane_size), p(planes * plane_size);
  for (int64_t q = 0; q < planes * plane_size; ++q)
    pooled_store<acc_t>(q, x, labels, g, y.data(), p.data());
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
  const MomentPlan plan = plan_moments(planes, g.h - g.radius + 1, d);
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
  // (a) pooled maps again, (d) stencil: pooled_maps_kernel, pooled_grad_kernel
  std::vector<acc_t> y(planes * plane_size), p(planes * plane_size), grad_pooled(y.size());
  for (int64_t q = 0; q < planes * plane_size; ++q)
    pooled_store<acc_t>(q, x, labels, g, y.data(), p.data());
  for (int64_t q = 0; q < planes * plane_size; ++q)
    pooled_grad_store(q, y.data(), p.data(), coef.data(), shift.data(), g, grad_pooled.data());
  // softmax mode: logsumexp_kernel
  std::vector<acc_t> lse;
  if (g.mode == rmi::kSoftmaxMode) {
    lse.resize(g.N * g.H * g.W);
    for (int64_t q = 0; q < g.N * g.H * g.W; ++q)
      lse[q] = logsumexp_at<acc_t>(x, g, q / (g.H * g.W), (q / g.W) % g.H, q % g.W);
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
    full_grad_store<acc_t>(q, x, labels, g, grad_pooled.data(), lse.empty() ? nullptr : lse.data(),
                           base_scale.data(), grad.data(), os);
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

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) fail("usage: emulate IN OUT");
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
