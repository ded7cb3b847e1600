"""Dropout masks generated inside the Triton kernels (ALGORITHM.md §1).

The adapters' input dropout is never materialized: every kernel that needs the
mask of element ``(m, k)`` of the ``[M, K]`` adapter input regenerates it from
the call's 64-bit ``seed`` with Philox (``tl.rand``)::

    keep(m, k) = philox_uniform(seed, counter = m * K + k) >= p      (fp32 uniform in [0, 1))
    drop(x)[m, k] = x[m, k] / (1 - p)  if keep(m, k)  else 0

The counter is the element's index in the logical row-major ``[M, K]`` input
(independent of strides and of any kernel's tile sizes), so the forward shrink,
the backward input-gradient expand and the weight-gradient kernel all see the
same mask, and nothing is stored between forward and backward but the seed
(an int64 ``[1]`` device tensor). One mask is shared by the four adapters.

:func:`keep_mask` is the ``@triton.jit`` helper every kernel calls;
:func:`dropout_mask` materializes the same mask as a tensor (for tests and
references only; the library itself never calls it on its hot path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter
from .launch import launch

__all__ = ["keep_mask", "dropout_mask"]


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p):
    """``[len(rows), len(cols)]`` bool: True where element ``(row, col)`` of the ``[*, n_cols]``
    adapter input is kept. ``rows``/``cols`` are the tile's logical indices (any int type)."""
    counter = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    return tl.rand(seed, counter) >= p


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = keep_mask(seed, rows, cols, K, p)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < M) & (cols[None, :] < K))


def dropout_mask(m: int, k: int, p: float, seed: torch.Tensor) -> torch.Tensor:
    """The ``[m, k]`` bool keep-mask the Triton kernels use for ``seed`` (int64 ``[1]`` on their device)."""
    out = torch.empty((m, k), dtype=torch.int8, device=seed.device)
    if m and k:
        bm, bk = (16, 32) if triton_interpreter() else (32, 128)
        launch(_dropout_mask_kernel, (triton.cdiv(m, bm), triton.cdiv(k, bk)),
               seed, out, m, k, float(p), BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
    return out.bool()
