// Fused weight gradient + per-sample Fisher accumulation (ALGORITHM.md §2):
// see include/mage_kernels/weight_grad.h.
//
// A tiled GEMM over the token dimension. Block (bx, by, bz) owns the output
// tile p in [by*BP, (by+1)*BP), q in [bx*BQ, (bx+1)*BQ) and a range of row
// "segments" (bz). With a Fisher buffer a segment is one sample: the block
// accumulates that sample's product g_n^T diag(w_n) x_n for its tile in
// registers, squares it, adds the square to a register Fisher accumulator and
// moves on to the next sample; the [N, P, Q] per-sample gradients never touch
// memory. Without a Fisher buffer the rows are split into segments only to give
// every SM work. When several blocks share a tile (grid z > 1) they combine
// with fp32 atomics (the gradient through an fp32 buffer), otherwise each
// output element is written by exactly one thread.
#include <cuda_runtime.h>

#include <algorithm>

#include "element_io.cuh"
#include "mage_kernels/weight_grad.h"

namespace mage_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerTile = 16;  // rows (tokens) staged in shared memory per step
constexpr int64_t kMinRowsPerSegment = 64;  // without Fisher: don't split finer than this

enum Mode : int { kGradOnly = 0, kFisher = 1, kFisherWeighted = 2 };

template <typename T>
struct KernelParams {
  const T* g;
  int64_t g_stride_m, g_stride_p;
  const T* x;
  int64_t x_stride_m, x_stride_q;
  int64_t M, P, Q;
  int64_t rows_per_segment, num_segments, segments_per_block;
  float scale;
  float fisher_coef;  // fisher_scale * scale
  float* fisher;
  int64_t fisher_stride_p, fisher_stride_q;
  const float* token_weight;
  T* out;          // [P, Q] contiguous (direct stores when !atomics)
  float* out_f32;  // [P, Q] contiguous fp32 accumulation target (atomics)
  bool atomics;
};

// Tile shapes: BP x BQ outputs per block, each thread owns TMP x TNQ of them,
// interleaved (p = ty + i*TY, q = tx + j*TX) so shared-memory reads and global
// stores of neighbouring threads hit neighbouring addresses.
template <int BP_, int BQ_, int TMP_, int TNQ_>
struct Tile {
  static constexpr int BP = BP_, BQ = BQ_, TMP = TMP_, TNQ = TNQ_;
  static constexpr int TY = BP / TMP, TX = BQ / TNQ;
  static_assert(TY * TX == kThreads, "tile must map onto the block");
};
using TileSmallP = Tile<16, 128, 2, 4>;  // P <= 16 (LoRA dA: P = rank)
using TileSquare = Tile<64, 64, 4, 4>;
using TileSmallQ = Tile<128, 16, 4, 2>;  // Q <= 16 (LoRA dB: Q = rank)

template <typename T, class TL, int MODE>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(const KernelParams<T> prm) {
  constexpr int BK = kRowsPerTile, BP = TL::BP, BQ = TL::BQ, TMP = TL::TMP, TNQ = TL::TNQ, TY = TL::TY, TX = TL::TX;
  __shared__ float gs[BK][BP];
  __shared__ float xs[BK][BQ];
  __shared__ float ws[BK];

  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * BP, q0 = static_cast<int64_t>(blockIdx.x) * BQ;

  float acc_b[TMP][TNQ];  // batch gradient (unweighted)
  float acc_s[TMP][TNQ];  // current sample's gradient (token-weighted)
  float acc_f[TMP][TNQ];  // sum over samples of the squared, scaled sample gradient
#pragma unroll
  for (int i = 0; i < TMP; ++i)
#pragma unroll
    for (int j = 0; j < TNQ; ++j) acc_b[i][j] = acc_s[i][j] = acc_f[i][j] = 0.0f;

  const int64_t seg_begin = static_cast<int64_t>(blockIdx.z) * prm.segments_per_block;
  const int64_t seg_end = min(prm.num_segments, seg_begin + prm.segments_per_block);
  for (int64_t seg = seg_begin; seg < seg_end; ++seg) {
    const int64_t r0 = seg * prm.rows_per_segment;
    const int64_t r1 = min(prm.M, r0 + prm.rows_per_segment);
    for (int64_t k0 = r0; k0 < r1; k0 += BK) {
      const int kmax = static_cast<int>(min(static_cast<int64_t>(BK), r1 - k0));
      // Stage rows k0..k0+kmax of g[:, p0:p0+BP] and x[:, q0:q0+BQ] (zero padded).
      for (int e = tid; e < BK * BP; e += kThreads) {
        const int r = e / BP, c = e % BP;
        const int64_t p = p0 + c;
        gs[r][c] = (r < kmax && p < prm.P) ? detail::to_float(prm.g[(k0 + r) * prm.g_stride_m + p * prm.g_stride_p]) : 0.0f;
      }
      for (int e = tid; e < BK * BQ; e += kThreads) {
        const int r = e / BQ, c = e % BQ;
        const int64_t q = q0 + c;
        xs[r][c] = (r < kmax && q < prm.Q) ? detail::to_float(prm.x[(k0 + r) * prm.x_stride_m + q * prm.x_stride_q]) : 0.0f;
      }
      if (MODE == kFisherWeighted && tid < BK) ws[tid] = tid < kmax ? prm.token_weight[k0 + tid] : 0.0f;
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kmax; ++kk) {
        float a[TMP], b[TNQ];
#pragma unroll
        for (int i = 0; i < TMP; ++i) a[i] = gs[kk][ty + i * TY];
#pragma unroll
        for (int j = 0; j < TNQ; ++j) b[j] = xs[kk][tx + j * TX];
        const float w = MODE == kFisherWeighted ? ws[kk] : 1.0f;
#pragma unroll
        for (int i = 0; i < TMP; ++i) {
          const float aw = a[i] * w;
#pragma unroll
          for (int j = 0; j < TNQ; ++j) {
            if (MODE == kGradOnly || MODE == kFisherWeighted) acc_b[i][j] = fmaf(a[i], b[j], acc_b[i][j]);
            if (MODE == kFisher) acc_s[i][j] = fmaf(a[i], b[j], acc_s[i][j]);
            if (MODE == kFisherWeighted) acc_s[i][j] = fmaf(aw, b[j], acc_s[i][j]);
          }
        }
      }
      __syncthreads();
    }
    if (MODE != kGradOnly) {  // the sample is complete: square it into the Fisher accumulator
#pragma unroll
      for (int i = 0; i < TMP; ++i)
#pragma unroll
        for (int j = 0; j < TNQ; ++j) {
          const float v = prm.fisher_coef * acc_s[i][j];
          acc_f[i][j] = fmaf(v, v, acc_f[i][j]);
          if (MODE == kFisher) acc_b[i][j] += acc_s[i][j];
          acc_s[i][j] = 0.0f;
        }
    }
  }

#pragma unroll
  for (int i = 0; i < TMP; ++i) {
    const int64_t p = p0 + ty + i * TY;
    if (p >= prm.P) continue;
#pragma unroll
    for (int j = 0; j < TNQ; ++j) {
      const int64_t q = q0 + tx + j * TX;
      if (q >= prm.Q) continue;
      const float v = prm.scale * acc_b[i][j];
      if (prm.atomics) {
        atomicAdd(prm.out_f32 + p * prm.Q + q, v);
      } else {
        prm.out[p * prm.Q + q] = detail::from_float<T>(v);
      }
      if (MODE != kGradOnly) {
        float* f = prm.fisher + p * prm.fisher_stride_p + q * prm.fisher_stride_q;
        if (prm.atomics) atomicAdd(f, acc_f[i][j]); else *f += acc_f[i][j];
      }
    }
  }
}

template <typename T>
__global__ void convert_from_f32_kernel(const float* __restrict__ in, T* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = detail::from_float<T>(in[i]);
}

template <class TL>
void tile_shape(int64_t* bp, int64_t* bq) { *bp = TL::BP; *bq = TL::BQ; }

void config_shape(int config, int64_t* bp, int64_t* bq) {
  if (config == 0) tile_shape<TileSmallP>(bp, bq);
  else if (config == 2) tile_shape<TileSmallQ>(bp, bq);
  else tile_shape<TileSquare>(bp, bq);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, class TL>
cudaError_t launch_tile(const KernelParams<T>& prm, int mode, int64_t splits, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(ceil_div(prm.Q, TL::BQ)), static_cast<unsigned int>(ceil_div(prm.P, TL::BP)),
                  static_cast<unsigned int>(splits));
  switch (mode) {
    case kGradOnly: weight_grad_kernel<T, TL, kGradOnly><<<grid, kThreads, 0, stream>>>(prm); break;
    case kFisher: weight_grad_kernel<T, TL, kFisher><<<grid, kThreads, 0, stream>>>(prm); break;
    default: weight_grad_kernel<T, TL, kFisherWeighted><<<grid, kThreads, 0, stream>>>(prm); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const WeightGradArgs& a, const WeightGradPlan& plan, void* workspace, cudaStream_t stream) {
  KernelParams<T> prm;
  prm.g = static_cast<const T*>(a.g);
  prm.g_stride_m = a.g_stride_m;
  prm.g_stride_p = a.g_stride_p;
  prm.x = static_cast<const T*>(a.x);
  prm.x_stride_m = a.x_stride_m;
  prm.x_stride_q = a.x_stride_q;
  prm.M = a.M;
  prm.P = a.P;
  prm.Q = a.Q;
  prm.rows_per_segment = plan.rows_per_segment;
  prm.num_segments = plan.num_segments;
  prm.segments_per_block = plan.segments_per_block;
  prm.scale = a.scale;
  prm.fisher_coef = a.fisher_scale * a.scale;
  prm.fisher = a.fisher;
  prm.fisher_stride_p = a.fisher_stride_p;
  prm.fisher_stride_q = a.fisher_stride_q;
  prm.token_weight = a.token_weight;
  prm.out = static_cast<T*>(a.grad);
  prm.atomics = plan.splits > 1;
  prm.out_f32 = nullptr;
  const std::size_t out_bytes = sizeof(float) * static_cast<std::size_t>(a.P * a.Q);
  if (prm.atomics) {
    prm.out_f32 = a.dtype == DType::kFloat32 ? static_cast<float*>(a.grad) : static_cast<float*>(workspace);
    const cudaError_t err = cudaMemsetAsync(prm.out_f32, 0, out_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  const int mode = a.fisher == nullptr ? kGradOnly : (a.token_weight == nullptr ? kFisher : kFisherWeighted);
  cudaError_t err;
  if (plan.tile_config == 0) err = launch_tile<T, TileSmallP>(prm, mode, plan.splits, stream);
  else if (plan.tile_config == 2) err = launch_tile<T, TileSmallQ>(prm, mode, plan.splits, stream);
  else err = launch_tile<T, TileSquare>(prm, mode, plan.splits, stream);
  if (err != cudaSuccess || !prm.atomics || a.dtype == DType::kFloat32) return err;
  const int64_t n = a.P * a.Q;
  const unsigned int blocks = static_cast<unsigned int>(min(ceil_div(n, 256), static_cast<int64_t>(4096)));
  convert_from_f32_kernel<T><<<blocks, 256, 0, stream>>>(prm.out_f32, static_cast<T*>(a.grad), n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t weight_grad_plan(const WeightGradArgs& a, int num_sms, WeightGradPlan* plan) {
  if (plan == nullptr || a.M < 0 || a.P < 0 || a.Q < 0) return cudaErrorInvalidValue;
  if (a.fisher != nullptr && (a.num_samples <= 0 || a.M % a.num_samples != 0)) return cudaErrorInvalidValue;
  WeightGradPlan pl;
  pl.tile_config = a.P <= 16 ? 0 : (a.Q <= 16 ? 2 : 1);
  int64_t bp = 0, bq = 0;
  config_shape(pl.tile_config, &bp, &bq);
  const int64_t tiles_p = ceil_div(a.P, bp), tiles_q = ceil_div(a.Q, bq);
  if (tiles_p > 65535 || tiles_q > 0x7fffffffLL) return cudaErrorInvalidValue;
  if (num_sms <= 0) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
  }
  const int64_t tiles = std::max<int64_t>(1, tiles_p * tiles_q);
  const int64_t wanted_splits = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(num_sms), tiles));
  if (a.M == 0) {
    pl.rows_per_segment = 1;
    pl.num_segments = 0;
  } else if (a.fisher != nullptr) {
    pl.rows_per_segment = a.M / a.num_samples;  // one segment per sample
    pl.num_segments = a.num_samples;
  } else {
    int64_t rows = std::max(kMinRowsPerSegment, ceil_div(a.M, wanted_splits));
    pl.rows_per_segment = ceil_div(rows, kRowsPerTile) * kRowsPerTile;
    pl.num_segments = ceil_div(a.M, pl.rows_per_segment);
  }
  const int64_t splits = std::min<int64_t>({wanted_splits, std::max<int64_t>(1, pl.num_segments), 65535});
  pl.segments_per_block = std::max<int64_t>(1, ceil_div(pl.num_segments, splits));
  pl.splits = std::max<int64_t>(1, ceil_div(pl.num_segments, pl.segments_per_block));
  pl.workspace_bytes = (pl.splits > 1 && a.dtype != DType::kFloat32) ? sizeof(float) * static_cast<std::size_t>(a.P * a.Q) : 0;
  *plan = pl;
  return cudaSuccess;
}

cudaError_t weight_grad_with_fisher_launch(const WeightGradArgs& a, const WeightGradPlan& plan, void* workspace,
                                           cudaStream_t stream) {
  if (a.P == 0 || a.Q == 0) return cudaSuccess;
  if (a.grad == nullptr || (a.M > 0 && (a.g == nullptr || a.x == nullptr)) ||
      (plan.workspace_bytes > 0 && workspace == nullptr) || plan.splits < 1 || plan.splits > 65535)
    return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat16: return launch_typed<__half>(a, plan, workspace, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(a, plan, workspace, stream);
    default: return launch_typed<float>(a, plan, workspace, stream);
  }
}

}  // namespace mage_kernels
