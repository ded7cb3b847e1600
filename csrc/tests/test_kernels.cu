// Standalone check of the mage-kernels CUDA launchers against plain CPU loops
// (no torch). Built by CMakeLists.txt as `test_mage_kernels` and run by CTest;
// exits 0 on success, 1 on a mismatch, 77 (CTest "skipped") without a GPU.
//
//   PEMA: several tensors of ragged sizes and mixed fp32/fp16/bf16 storage in
//   one launch, misaligned pointers (scalar path), elements that hit the
//   fallback and NaN/inf inputs. The kernel uses explicitly rounded fp32 ops, so
//   the updated EMA and the counters must match the CPU loop EXACTLY.
//
//   weight gradient + Fisher: fp32/fp16/bf16, ragged P/Q/T, with and without
//   token weights, a strided Fisher view, many samples (atomic split path) and
//   few samples (direct path), compared with a float64 CPU loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "mage_kernels/pema.h"
#include "mage_kernels/weight_grad.h"

using mage_kernels::DType;

namespace {

int g_failures = 0;

#define CHECK_CUDA(expr)                                                                      \
  do {                                                                                        \
    const cudaError_t err_ = (expr);                                                          \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++g_failures;
  }
}

// Host storage of one array in a given dtype, plus its fp32 view.
struct HostArray {
  DType dtype;
  std::vector<unsigned char> bytes;
  int64_t n;
  HostArray(DType t, int64_t count) : dtype(t), bytes(static_cast<size_t>(count) * mage_kernels::dtype_size(t)), n(count) {}
  float get(int64_t i) const {
    switch (dtype) {
      case DType::kFloat16: return __half2float(reinterpret_cast<const __half*>(bytes.data())[i]);
      case DType::kBFloat16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(bytes.data())[i]);
      default: return reinterpret_cast<const float*>(bytes.data())[i];
    }
  }
  void set(int64_t i, float v) {
    switch (dtype) {
      case DType::kFloat16: reinterpret_cast<__half*>(bytes.data())[i] = __float2half_rn(v); break;
      case DType::kBFloat16: reinterpret_cast<__nv_bfloat16*>(bytes.data())[i] = __float2bfloat16_rn(v); break;
      default: reinterpret_cast<float*>(bytes.data())[i] = v;
    }
  }
};

// Device copy of a HostArray, `offset_elems` elements into a bigger allocation
// (offset 1 makes the pointer misaligned for 4-wide vector access).
struct DeviceArray {
  void* base = nullptr;
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceArray(const HostArray& h, int offset_elems) {
    const size_t es = mage_kernels::dtype_size(h.dtype);
    bytes = h.bytes.size();
    CHECK_CUDA(cudaMalloc(&base, bytes + es * (offset_elems + 1)));
    ptr = static_cast<unsigned char*>(base) + es * offset_elems;
    CHECK_CUDA(cudaMemcpy(ptr, h.bytes.data(), bytes, cudaMemcpyHostToDevice));
  }
  void download(HostArray& h) const { CHECK_CUDA(cudaMemcpy(h.bytes.data(), ptr, bytes, cudaMemcpyDeviceToHost)); }
  ~DeviceArray() { cudaFree(base); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

// The CPU loop PEMA is checked against: the same fp32 operations, in the same order.
float pema_cpu(float p, float e, float g, float f, float lam, float beta_fallback, int64_t& fb, int64_t& nf) {
  const volatile float diff = p - e;  // volatile: no contraction into FMA by the host compiler
  const volatile float prod = f * diff;
  const volatile float denom = prod + lam;
  const volatile float num = g + 1.0f;
  float beta = num / denom;
  if (!(beta > 0.0f && beta < 1.0f)) {
    beta = beta_fallback;
    ++fb;
  }
  const volatile float a = beta * e;
  const volatile float one_minus = 1.0f - beta;
  const volatile float b = one_minus * p;
  const float updated = a + b;
  if (!std::isfinite(updated)) {
    ++nf;
    return e;
  }
  return updated;
}

void test_pema() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  const int64_t sizes[] = {1, 3, 1000, 16384, 16387, 40000, 0, 70001};
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  const float lam = 1e-5f, beta_fallback = 0.99f;

  struct Group {
    HostArray p, e, g, f;
  };
  std::vector<Group> groups;
  std::vector<int> offsets;
  int k = 0;
  for (int64_t n : sizes) {
    // Mixed dtypes across and within groups; every fourth group misaligned.
    Group gr{HostArray(types[k % 3], n), HostArray(types[(k + 1) % 3], n), HostArray(types[k % 3], n),
             HostArray(DType::kFloat32, n)};
    for (int64_t i = 0; i < n; ++i) {
      const float theta = normal(rng);
      gr.p.set(i, theta);
      // ema close to theta with F large enough that some betas land in (0, 1), others not.
      gr.e.set(i, theta + 0.5f * normal(rng));
      gr.g.set(i, 0.5f * normal(rng));
      gr.f.set(i, 50.0f * uni(rng));
      const float r = uni(rng);
      if (r < 0.01f) gr.g.set(i, NAN);                // NaN beta -> fallback
      else if (r < 0.02f) gr.p.set(i, INFINITY);      // non-finite new value -> ema kept
      else if (r < 0.03f) gr.e.set(i, gr.p.get(i));   // theta == theta*: beta = (g+1)/lam
    }
    groups.push_back(std::move(gr));
    offsets.push_back(k % 4 == 3 ? 1 : 0);
    ++k;
  }

  std::vector<DeviceArray*> dev;
  std::vector<mage_kernels::PemaTensor> table;
  for (size_t t = 0; t < groups.size(); ++t) {
    Group& gr = groups[t];
    dev.push_back(new DeviceArray(gr.p, offsets[t]));
    dev.push_back(new DeviceArray(gr.e, offsets[t]));
    dev.push_back(new DeviceArray(gr.g, offsets[t]));
    dev.push_back(new DeviceArray(gr.f, 0));
    DeviceArray** d = &dev[dev.size() - 4];
    table.push_back({d[0]->ptr, d[1]->ptr, d[2]->ptr, d[3]->ptr, gr.p.n, gr.p.dtype, gr.e.dtype, gr.g.dtype, gr.f.dtype});
  }
  const int num = static_cast<int>(table.size());
  std::vector<int64_t> host_table((mage_kernels::pema_table_bytes(num) + 7) / 8);
  const int64_t chunks = mage_kernels::pema_fill_table(table.data(), num, host_table.data());
  void* dev_table = nullptr;
  int64_t* counts = nullptr;
  CHECK_CUDA(cudaMalloc(&dev_table, mage_kernels::pema_table_bytes(num)));
  CHECK_CUDA(cudaMemcpy(dev_table, host_table.data(), mage_kernels::pema_table_bytes(num), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&counts, 2 * sizeof(int64_t)));
  CHECK_CUDA(cudaMemset(counts, 0, 2 * sizeof(int64_t)));
  CHECK_CUDA(mage_kernels::pema_update_launch(dev_table, num, chunks, lam, beta_fallback, counts, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  int64_t want_fb = 0, want_nf = 0, mismatches = 0;
  for (size_t t = 0; t < groups.size(); ++t) {
    Group& gr = groups[t];
    HostArray got(gr.e.dtype, gr.e.n);
    dev[4 * t + 1]->download(got);
    HostArray want(gr.e.dtype, gr.e.n);
    for (int64_t i = 0; i < gr.e.n; ++i) {
      want.set(i, pema_cpu(gr.p.get(i), gr.e.get(i), gr.g.get(i), gr.f.get(i), lam, beta_fallback, want_fb, want_nf));
      if (std::memcmp(&got.bytes[i * mage_kernels::dtype_size(got.dtype)], &want.bytes[i * mage_kernels::dtype_size(got.dtype)],
                      mage_kernels::dtype_size(got.dtype)) != 0) {
        if (mismatches < 5)
          std::fprintf(stderr, "pema tensor %zu (%s) element %lld: got %g want %g\n", t, mage_kernels::dtype_name(got.dtype),
                       static_cast<long long>(i), got.get(i), want.get(i));
        ++mismatches;
      }
    }
  }
  int64_t got_counts[2];
  CHECK_CUDA(cudaMemcpy(got_counts, counts, sizeof(got_counts), cudaMemcpyDeviceToHost));
  std::printf("pema: %d tensors, %lld chunks, fallback %lld (want %lld), nonfinite %lld (want %lld), mismatches %lld\n",
              num, static_cast<long long>(chunks), static_cast<long long>(got_counts[0]), static_cast<long long>(want_fb),
              static_cast<long long>(got_counts[1]), static_cast<long long>(want_nf), static_cast<long long>(mismatches));
  expect(mismatches == 0, "pema: EMA differs from the CPU loop");
  expect(got_counts[0] == want_fb && got_counts[1] == want_nf, "pema: counters differ from the CPU loop");
  expect(want_fb > 0 && want_nf > 0 && want_fb < 300000, "pema: the test data must exercise both counters");
  for (DeviceArray* d : dev) delete d;
  cudaFree(dev_table);
  cudaFree(counts);
}

void test_weight_grad(DType dtype, int64_t N, int64_t T, int64_t P, int64_t Q, bool fisher, bool weighted,
                      bool strided_fisher) {
  std::mt19937 rng(static_cast<unsigned>(N * 131 + T * 17 + P * 7 + Q));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t M = N * T;
  const float scale = 0.75f, fisher_scale = 1.5f;
  HostArray g(dtype, M * P), x(dtype, M * Q);
  for (int64_t i = 0; i < M * P; ++i) g.set(i, normal(rng));
  for (int64_t i = 0; i < M * Q; ++i) x.set(i, normal(rng));
  std::vector<float> w(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) w[m] = (m % T) >= T - T / 3 ? 0.0f : 0.5f + 0.5f * std::fabs(normal(rng));  // "padding" tail
  // Fisher buffer: [P, Q] view with row stride Q + 3 inside a bigger buffer (or contiguous).
  const int64_t fs = strided_fisher ? Q + 3 : Q;
  std::vector<float> f0(static_cast<size_t>(P * fs));
  for (auto& v : f0) v = std::fabs(normal(rng));

  DeviceArray dg(g, 0), dx(x, 0);
  HostArray grad_h(dtype, P * Q);
  DeviceArray dgrad(grad_h, 0);
  float *df = nullptr, *dw = nullptr;
  CHECK_CUDA(cudaMalloc(&df, f0.size() * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(df, f0.data(), f0.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&dw, w.size() * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(dw, w.data(), w.size() * sizeof(float), cudaMemcpyHostToDevice));

  mage_kernels::WeightGradArgs a;
  a.dtype = dtype;
  a.M = M; a.P = P; a.Q = Q;
  a.g = dg.ptr; a.g_stride_m = P; a.g_stride_p = 1;
  a.x = dx.ptr; a.x_stride_m = Q; a.x_stride_q = 1;
  a.grad = dgrad.ptr;
  a.scale = scale;
  a.fisher = fisher ? df : nullptr;
  a.fisher_stride_p = fs; a.fisher_stride_q = 1;
  a.num_samples = N;
  a.token_weight = weighted ? dw : nullptr;
  a.fisher_scale = fisher_scale;
  mage_kernels::WeightGradPlan plan;
  CHECK_CUDA(mage_kernels::weight_grad_plan(a, 0, &plan));
  void* ws = nullptr;
  if (plan.workspace_bytes) CHECK_CUDA(cudaMalloc(&ws, plan.workspace_bytes));
  CHECK_CUDA(mage_kernels::weight_grad_with_fisher_launch(a, plan, ws, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  dgrad.download(grad_h);
  std::vector<float> f1(f0.size());
  CHECK_CUDA(cudaMemcpy(f1.data(), df, f1.size() * sizeof(float), cudaMemcpyDeviceToHost));

  double grad_err = 0, grad_max = 0, fisher_err = 0, fisher_max = 0, pad_err = 0;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t q = 0; q < Q; ++q) {
      double total = 0, fsum = 0;
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t m = n * T + t;
          const double prod = static_cast<double>(g.get(m * P + p)) * x.get(m * Q + q);
          total += prod;
          s += (weighted ? w[m] : 1.0) * prod;
        }
        const double v = static_cast<double>(fisher_scale) * scale * s;
        fsum += v * v;
      }
      const double want_grad = scale * total;
      grad_err = std::max(grad_err, std::fabs(grad_h.get(p * Q + q) - want_grad));
      grad_max = std::max(grad_max, std::fabs(want_grad));
      const double want_f = f0[p * fs + q] + (fisher ? fsum : 0.0);
      fisher_err = std::max(fisher_err, std::fabs(f1[p * fs + q] - want_f) / (1.0 + std::fabs(want_f)));
      fisher_max = std::max(fisher_max, want_f);
    }
  for (int64_t p = 0; p < P; ++p)  // the gap columns of the strided buffer stay untouched
    for (int64_t q = Q; q < fs; ++q) pad_err = std::max(pad_err, static_cast<double>(std::fabs(f1[p * fs + q] - f0[p * fs + q])));
  const double grad_tol = (dtype == DType::kFloat32 ? 2e-5 : (dtype == DType::kFloat16 ? 2e-3 : 1.6e-2)) * (grad_max + 1.0);
  char what[256];
  std::snprintf(what, sizeof(what), "weight_grad %s N=%lld T=%lld P=%lld Q=%lld fisher=%d weighted=%d strided=%d splits=%lld",
                mage_kernels::dtype_name(dtype), static_cast<long long>(N), static_cast<long long>(T),
                static_cast<long long>(P), static_cast<long long>(Q), fisher, weighted, strided_fisher,
                static_cast<long long>(plan.splits));
  std::printf("%s: grad err %.3g (tol %.3g), fisher rel err %.3g, gap err %.3g\n", what, grad_err, grad_tol, fisher_err, pad_err);
  expect(grad_err <= grad_tol, what);
  expect(fisher_err <= 2e-5, what);
  expect(pad_err == 0.0, what);
  if (ws) cudaFree(ws);
  cudaFree(df);
  cudaFree(dw);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: test skipped\n");
    return 77;
  }
  test_pema();
  const DType types[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  for (DType t : types) {
    test_weight_grad(t, 3, 37, 8, 300, true, false, false);     // dA-like: small P, few samples
    test_weight_grad(t, 64, 5, 13, 70, true, true, true);       // many samples -> atomic split path
    test_weight_grad(t, 4, 33, 200, 12, true, true, true);      // dB-like: small Q
    test_weight_grad(t, 2, 129, 70, 90, false, false, false);   // no Fisher: row split
    test_weight_grad(t, 1, 17, 65, 130, true, false, true);     // one sample, square tiles
  }
  if (g_failures) {
    std::printf("%d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
