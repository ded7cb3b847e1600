// PEMA multi-tensor update (ALGORITHM.md §3), CUDA launcher API.
//
// For every element of every tensor group (theta, theta*, g, F), in fp32:
//
//   beta   = (g + 1) / (F * (theta - theta*) + lam)
//   beta   = beta_fallback   unless 0 < beta < 1   (NaN and inf included)
//   new    = beta * theta* + (1 - beta) * theta
//   theta* = new             unless new is not finite (then theta* is kept)
//
// All groups are updated by ONE kernel launch. The launch reads a small table
// in device memory that lists every group (pointers, sizes, dtypes) and where
// its chunks start; the caller fills the table on the host with
// pema_fill_table(), copies it to the device on the same stream, and calls
// pema_update_launch(). No torch dependency.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "mage_kernels/dtype.h"

namespace mage_kernels {

/// One tensor group of the update. All four arrays are contiguous, on the
/// same device, with `numel` elements each; their dtypes may differ.
struct PemaTensor {
  const void* param;   // theta (read)
  void* ema;           // theta* (read, updated in place)
  const void* grad;    // batch gradient g (read)
  const void* fisher;  // Fisher diagonal F (read)
  int64_t numel;
  DType param_dtype;
  DType ema_dtype;
  DType grad_dtype;
  DType fisher_dtype;
};

/// Elements handled by one thread block (one "chunk" of a tensor).
constexpr int64_t kPemaChunkElems = 16384;

/// Bytes of the table describing `num_tensors` groups.
std::size_t pema_table_bytes(int num_tensors);

/// Writes the table for `tensors` into `host_table` (pema_table_bytes(num_tensors)
/// bytes of host memory, 8-byte aligned) and returns the number of chunks, i.e.
/// the number of thread blocks pema_update_launch() will start.
int64_t pema_fill_table(const PemaTensor* tensors, int num_tensors, void* host_table);

/// Runs the update on `stream`. `device_table` is a device copy of the table
/// pema_fill_table() wrote (copied on `stream` or before it). `counts` points to
/// two int64 values in device memory that the kernel ADDS to:
/// counts[0] += elements that used beta_fallback, counts[1] += elements whose new
/// value was not finite (left unchanged). Returns the launch status.
cudaError_t pema_update_launch(const void* device_table, int num_tensors, int64_t num_chunks, float lam,
                               float beta_fallback, int64_t* counts, cudaStream_t stream);

}  // namespace mage_kernels
