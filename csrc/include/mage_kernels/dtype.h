// Storage element types understood by the mage-kernels CUDA launchers.
//
// The launchers take raw device pointers plus one of these tags, so this
// header (and every launcher header) is free of torch and of CUDA's fp16/bf16
// headers: C++ users include it from plain host code.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define MAGE_HOST_DEVICE __host__ __device__
#else
#define MAGE_HOST_DEVICE
#endif

namespace mage_kernels {

/// Element type of a tensor in device memory. All arithmetic is done in fp32.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,   // IEEE half (__half)
  kBFloat16 = 2,  // bfloat16 (__nv_bfloat16)
};

/// Size in bytes of one element of `t`.
MAGE_HOST_DEVICE inline constexpr std::size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

/// Human-readable name of `t` ("float32", "float16", "bfloat16").
MAGE_HOST_DEVICE inline constexpr const char* dtype_name(DType t) {
  return t == DType::kFloat32 ? "float32" : (t == DType::kFloat16 ? "float16" : "bfloat16");
}

}  // namespace mage_kernels
