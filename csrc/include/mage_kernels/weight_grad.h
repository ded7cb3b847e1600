// Fused weight gradient + per-sample Fisher accumulation (ALGORITHM.md §2),
// CUDA launcher API.
//
//   grad[p, q]    = scale * sum_m g[m, p] x[m, q]                      ([P, Q], dtype of g)
//   fisher[p, q] += sum_n (fisher_scale * scale *
//                          sum_{m in sample n} w[m] g[m, p] x[m, q])^2   (fp32, in place)
//
// g is [M, P], x is [M, Q], M = num_samples * T, and sample n is the
// contiguous row block [n T, (n + 1) T). Each sample's [P, Q] product is
// formed tile by tile in registers and squared there; per-sample gradients are
// never written to memory. g, x and fisher may have arbitrary (e.g. sliced)
// strides, given in elements. No torch dependency.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "mage_kernels/dtype.h"

namespace mage_kernels {

struct WeightGradArgs {
  DType dtype = DType::kFloat32;  // dtype of g, x and grad
  int64_t M = 0, P = 0, Q = 0;
  const void* g = nullptr;  // [M, P]
  int64_t g_stride_m = 0, g_stride_p = 1;
  const void* x = nullptr;  // [M, Q]
  int64_t x_stride_m = 0, x_stride_q = 1;
  void* grad = nullptr;  // [P, Q], contiguous, written (not accumulated)
  float scale = 1.0f;
  float* fisher = nullptr;  // [P, Q] fp32, accumulated into; nullptr: no Fisher
  int64_t fisher_stride_p = 0, fisher_stride_q = 1;
  int64_t num_samples = 1;             // > 0 and dividing M when fisher is set
  const float* token_weight = nullptr;  // [M] fp32 contiguous, or nullptr (all ones); Fisher only
  float fisher_scale = 1.0f;
};

/// How a call is split over thread blocks; computed by weight_grad_plan().
struct WeightGradPlan {
  int tile_config = 0;            // which tile shape the kernel uses
  int64_t rows_per_segment = 0;   // rows of one segment (= one sample when fisher is set)
  int64_t num_segments = 0;       // ceil(M / rows_per_segment)
  int64_t segments_per_block = 0; // segments handled by one block along grid z
  int64_t splits = 1;             // blocks along grid z; > 1 means fp32 atomics
  std::size_t workspace_bytes = 0;  // fp32 scratch the launch needs (0: none)
};

/// Plans the launch for the current device (`num_sms` <= 0: query the current
/// device). Returns cudaErrorInvalidValue for inconsistent arguments.
cudaError_t weight_grad_plan(const WeightGradArgs& args, int num_sms, WeightGradPlan* plan);

/// Runs the kernel(s) on `stream`. `workspace` must hold plan.workspace_bytes
/// bytes of device memory (may be nullptr when that is 0).
cudaError_t weight_grad_with_fisher_launch(const WeightGradArgs& args, const WeightGradPlan& plan, void* workspace,
                                           cudaStream_t stream);

}  // namespace mage_kernels
