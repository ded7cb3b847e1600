// PEMA multi-tensor update (ALGORITHM.md §3): see include/mage_kernels/pema.h.
//
// Multi-tensor apply: the device table holds one PemaTensor per group followed
// by `chunk_start[num_tensors + 1]` (prefix sums of each tensor's chunk count).
// Block b finds its tensor by binary search over chunk_start and updates the
// kPemaChunkElems elements of chunk b - chunk_start[t] of that tensor, with
// 4-wide vector loads/stores when all four arrays are aligned for them.
// Arithmetic is fp32 with explicitly rounded operations (no FMA contraction), so
// the result matches the plain-PyTorch reference operation by operation.
#include <cuda_runtime.h>

#include <cstring>

#include "element_io.cuh"
#include "mage_kernels/pema.h"

namespace mage_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

__device__ __forceinline__ float pema_element(float p, float e, float g, float f, float lam, float beta_fallback,
                                              unsigned int& n_fallback, unsigned int& n_nonfinite) {
  const float denom = __fadd_rn(__fmul_rn(f, __fsub_rn(p, e)), lam);
  float beta = __fdiv_rn(__fadd_rn(g, 1.0f), denom);
  if (!(beta > 0.0f && beta < 1.0f)) {  // NaN compares false: falls back too
    beta = beta_fallback;
    ++n_fallback;
  }
  const float updated = __fadd_rn(__fmul_rn(beta, e), __fmul_rn(__fsub_rn(1.0f, beta), p));
  if (!isfinite(updated)) {
    ++n_nonfinite;
    return e;  // theta* unchanged (stored back bit-exactly: e came from the same dtype)
  }
  return updated;
}

__global__ void __launch_bounds__(kThreads)
    pema_update_kernel(const unsigned char* __restrict__ table, int num_tensors, float lam, float beta_fallback,
                       unsigned long long* __restrict__ counts) {
  const PemaTensor* tensors = reinterpret_cast<const PemaTensor*>(table);
  const int64_t* chunk_start = reinterpret_cast<const int64_t*>(table + sizeof(PemaTensor) * num_tensors);
  const int64_t chunk = blockIdx.x;

  __shared__ int s_tensor;
  __shared__ unsigned int s_scratch[kThreads / 32];
  if (threadIdx.x == 0) {
    // Last t with chunk_start[t] <= chunk; empty tensors are skipped because
    // their start equals the next tensor's start.
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
    }
    s_tensor = lo;
  }
  __syncthreads();
  const int t = s_tensor;
  const PemaTensor tm = tensors[t];
  const int64_t begin = (chunk - chunk_start[t]) * kPemaChunkElems;
  const int64_t n = min(kPemaChunkElems, tm.numel - begin);

  unsigned int n_fallback = 0, n_nonfinite = 0;
  const bool vec = detail::aligned_vec4(tm.param, tm.param_dtype) && detail::aligned_vec4(tm.ema, tm.ema_dtype) &&
                   detail::aligned_vec4(tm.grad, tm.grad_dtype) && detail::aligned_vec4(tm.fisher, tm.fisher_dtype);
  int64_t done = 0;
  if (vec) {  // begin is a multiple of kVec, so every vector access is aligned
    const int64_t n_vec = n / kVec * kVec;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < n_vec; i += kThreads * kVec) {
      const int64_t k = begin + i;
      float p[kVec], e[kVec], g[kVec], f[kVec], out[kVec];
      detail::load_vec4(tm.param, tm.param_dtype, k, p);
      detail::load_vec4(tm.ema, tm.ema_dtype, k, e);
      detail::load_vec4(tm.grad, tm.grad_dtype, k, g);
      detail::load_vec4(tm.fisher, tm.fisher_dtype, k, f);
#pragma unroll
      for (int j = 0; j < kVec; ++j) out[j] = pema_element(p[j], e[j], g[j], f[j], lam, beta_fallback, n_fallback, n_nonfinite);
      detail::store_vec4(tm.ema, tm.ema_dtype, k, out);
    }
    done = n_vec;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {  // unaligned tensors and the < kVec tail
    const int64_t k = begin + i;
    const float e = detail::load_elem(tm.ema, tm.ema_dtype, k);
    const float out = pema_element(detail::load_elem(tm.param, tm.param_dtype, k), e,
                                   detail::load_elem(tm.grad, tm.grad_dtype, k),
                                   detail::load_elem(tm.fisher, tm.fisher_dtype, k), lam, beta_fallback, n_fallback,
                                   n_nonfinite);
    detail::store_elem(tm.ema, tm.ema_dtype, k, out);
  }

  // One atomic per counter per block (and none when the block counted nothing).
  const unsigned int block_fallback = detail::block_sum<kThreads>(n_fallback, s_scratch);
  __syncthreads();  // s_scratch is reused
  const unsigned int block_nonfinite = detail::block_sum<kThreads>(n_nonfinite, s_scratch);
  if (threadIdx.x == 0) {
    if (block_fallback) atomicAdd(&counts[0], static_cast<unsigned long long>(block_fallback));
    if (block_nonfinite) atomicAdd(&counts[1], static_cast<unsigned long long>(block_nonfinite));
  }
}

}  // namespace

std::size_t pema_table_bytes(int num_tensors) {
  return sizeof(PemaTensor) * static_cast<std::size_t>(num_tensors) +
         sizeof(int64_t) * (static_cast<std::size_t>(num_tensors) + 1);
}

int64_t pema_fill_table(const PemaTensor* tensors, int num_tensors, void* host_table) {
  unsigned char* out = static_cast<unsigned char*>(host_table);
  std::memcpy(out, tensors, sizeof(PemaTensor) * static_cast<std::size_t>(num_tensors));
  int64_t* chunk_start = reinterpret_cast<int64_t*>(out + sizeof(PemaTensor) * static_cast<std::size_t>(num_tensors));
  int64_t total = 0;
  for (int t = 0; t < num_tensors; ++t) {
    chunk_start[t] = total;
    total += (tensors[t].numel + kPemaChunkElems - 1) / kPemaChunkElems;
  }
  chunk_start[num_tensors] = total;
  return total;
}

cudaError_t pema_update_launch(const void* device_table, int num_tensors, int64_t num_chunks, float lam,
                               float beta_fallback, int64_t* counts, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_tensors <= 0 || num_chunks < 0 || num_chunks > 0x7fffffffLL || device_table == nullptr || counts == nullptr)
    return cudaErrorInvalidValue;
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counter width");
  pema_update_kernel<<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(
      static_cast<const unsigned char*>(device_table), num_tensors, lam, beta_fallback,
      reinterpret_cast<unsigned long long*>(counts));
  return cudaGetLastError();
}

}  // namespace mage_kernels
