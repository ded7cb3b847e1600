// Device helpers: load/store fp32/fp16/bf16 storage as fp32 values.
// Internal to csrc/kernels (not part of the public launcher API).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mage_kernels/dtype.h"

namespace mage_kernels {
namespace detail {

// ---- compile-time element types (used by the GEMM-like kernels) ----------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- run-time element types (used by the multi-tensor kernel, where every
// tensor of the table may have its own dtype; the switch is uniform per block)

__device__ __forceinline__ float load_elem(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_elem(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kFloat16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Four consecutive elements starting at i; p + i must be aligned to 4 elements
// (16 bytes for fp32, 8 bytes for fp16/bf16): one vector memory transaction.
__device__ __forceinline__ void load_vec4(const void* p, DType t, int64_t i, float (&v)[4]) {
  switch (t) {
    case DType::kFloat16: {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __half*>(p) + i);
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
      v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
      break;
    }
    case DType::kBFloat16: {
      const uint2 raw = *reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(p) + i);
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
      break;
    }
    default: {
      const float4 f = *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
      v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
    }
  }
}

__device__ __forceinline__ void store_vec4(void* p, DType t, int64_t i, const float (&v)[4]) {
  switch (t) {
    case DType::kFloat16: {
      uint2 raw;
      *reinterpret_cast<__half2*>(&raw.x) = __floats2half2_rn(v[0], v[1]);
      *reinterpret_cast<__half2*>(&raw.y) = __floats2half2_rn(v[2], v[3]);
      *reinterpret_cast<uint2*>(static_cast<__half*>(p) + i) = raw;
      break;
    }
    case DType::kBFloat16: {
      uint2 raw;
      *reinterpret_cast<__nv_bfloat162*>(&raw.x) = __floats2bfloat162_rn(v[0], v[1]);
      *reinterpret_cast<__nv_bfloat162*>(&raw.y) = __floats2bfloat162_rn(v[2], v[3]);
      *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p) + i) = raw;
      break;
    }
    default:
      *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

__device__ __forceinline__ bool aligned_vec4(const void* p, DType t) {
  return (reinterpret_cast<uintptr_t>(p) % (4 * dtype_size(t))) == 0;
}

// Sum of `v` over the block (all threads must call; result valid in thread 0).
// `scratch` holds one value per warp.
template <int kThreads>
__device__ __forceinline__ unsigned int block_sum(unsigned int v, unsigned int* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  unsigned int total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  }
  return total;
}

}  // namespace detail
}  // namespace mage_kernels
