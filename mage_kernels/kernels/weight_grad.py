"""Fused LoRA weight gradient + per-sample Fisher diagonal (ALGORITHM.md §2, paper Eq. 2).

The MAGE Fisher is the mean of per-sample SQUARED gradients,
``F = (1/N) sum_n (d loss_n / d theta)^2`` -- not the square of the batch
gradient. For a LoRA factor the per-sample gradient is a small GEMM over that
sample's tokens (``dA(n) = (s G_n)^T drop(X_n)``, ``dB(n) = dY_n^T (s u_n)``), so one
kernel can produce both the batch gradient and the Fisher without ever
materializing the ``[N, P, Q]`` per-sample gradients.

Three shapes of the work, chosen by the wrapper from ``T = M / N`` tokens per sample:

* ``T = 1`` (inputs ``[N, d]``): the per-sample gradient of sample ``n`` is the outer
  product ``w_n g_n x_n^T``, so its square is ``w_n^2 g_n^2 (x_n^2)^T`` and the
  Fisher is ONE GEMM of elementwise squares::

      F += c^2 * sum_n (w_n g_n)^2 (x_n)^2^T = c^2 * ((w g) o (w g))^T (x o x)      (c = fisher_scale * scale)

  (``o`` the elementwise product), computed by :func:`_weight_grad_t1_kernel` in the
  same pass over the tiles of ``g`` and ``x`` as the batch gradient ``g^T x``: a plain
  pipelined GEMM over the token axis, no per-sample loop. The squares are formed in
  fp32 and multiplied with ``tf32x3`` (fp32-accurate) tensor-core dots on the GPU.
* ``1 < T <= 64``: each sample is ONE ``[BLOCK_T]`` tile; the kernel's loop over samples
  is its innermost loop (loads of sample ``n+1`` overlap the dot of sample ``n``).
* longer samples: a loop over samples with an inner (pipelined) loop over the sample's
  tokens.

In the last two, each program owns one ``[BLOCK_P, BLOCK_Q]`` tile of the ``[P, Q]``
result, forms each sample's product tile ``g_n^T diag(w_n) x_n`` in registers (fp32),
adds it to the batch-gradient accumulator and its square (times
``(fisher_scale * scale)^2``) to the Fisher accumulator. At the end the gradient
tile is stored and the Fisher tile is added into the caller's fp32 buffer with a
plain load/add/store (each program owns its tile, so no atomics are needed and
``fisher`` may be any strided view, e.g. the trainable columns ``fisher_b[:, i:j]``
of a bigger buffer). Repeated calls (micro-batches) keep adding into it; the caller
divides by the number of samples seen.

When few output tiles exist (e.g. ``dA`` of a rank-8 adapter on a narrow
layer) the samples are split over a second grid axis; each split writes fp32
partial tiles to a ``[splits, P, Q]`` workspace that is summed afterwards
(still no per-sample tensors). Without ``fisher`` the kernel is a plain
``scale * g^T x`` split over the token axis.

Dropout: with ``dropout_p > 0`` the ``x`` operand is the adapters' dropped-out input
``drop(x)``, its mask regenerated from the seed (:mod:`.dropout`), never stored.

:func:`weight_grad_with_fisher` is the Triton implementation (the primitive the
Triton paths of :mod:`mage_kernels.lora_op` use).
The custom op ``torch.ops.mage.weight_grad_with_fisher`` that dispatches to the
torch reference, this Triton kernel or the CUDA extension lives in the
Triton-free module :mod:`mage_kernels.weight_grad_op` (registered by a plain
``import mage_kernels``). This module imports nothing from the op modules, so
the op module can import it lazily without an import circle.
Semantics are exactly :func:`mage_kernels.reference.weight_grad_with_fisher`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter
from .dropout import keep_mask
from .launch import launch, recording
from .lora import _check_dropout, _check_operands, dot_allows_tf32, num_sms

__all__ = ["weight_grad_with_fisher", "ONE_TILE_MAX_T"]

#: Samples of at most this many tokens are one tile each (the loop over samples pipelines).
ONE_TILE_MAX_T = 64


@triton.jit
def _weight_grad_kernel(
    g_ptr, x_ptr, w_ptr, grad_ptr, fisher_ptr, seed_ptr,
    M, P, Q, T, num_samples, samples_per_split,
    stride_gm, stride_gp, stride_xm, stride_xq, stride_w,
    stride_grad_s, stride_grad_p, stride_grad_q,
    stride_f_s, stride_f_p, stride_f_q,
    scale, fisher_coef, dropout_p,
    HAS_FISHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, FISHER_IN_PLACE: tl.constexpr,
    ALLOW_TF32: tl.constexpr, DROPOUT: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid_tile // num_q
    pid_q = pid_tile % num_q
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    offs_p64 = offs_p.to(tl.int64)
    offs_q64 = offs_q.to(tl.int64)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    grad_acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    fisher_acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    n_start = pid_split * samples_per_split
    n_end = tl.minimum(n_start + samples_per_split, num_samples)
    for n in range(n_start, n_end):
        row_start = n * T
        row_end = tl.minimum(row_start + T, M)
        if ONE_TILE:
            # The whole sample is one tile (T <= BLOCK_T): this loop over samples is the
            # innermost loop, so the loads of the next sample overlap this sample's dot.
            rows = offs_t + row_start  # int64 (offs_t is), so row * stride cannot overflow
            mask_t = rows < row_end
            gt = tl.load(g_ptr + offs_p64[:, None] * stride_gp + rows[None, :] * stride_gm,
                         mask=mask_p[:, None] & mask_t[None, :], other=0.0)
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_q64[None, :] * stride_xq,
                         mask=mask_t[:, None] & mask_q[None, :], other=0.0)
            if DROPOUT:
                xt = tl.where(keep_mask(seed, rows, offs_q, Q, dropout_p), xt, 0.0)
            if ALLOW_TF32:
                sample = tl.dot(gt, xt, input_precision="tf32")
            else:
                sample = tl.dot(gt, xt, input_precision="ieee")
            if HAS_FISHER and HAS_WEIGHT:
                w = tl.load(w_ptr + rows * stride_w, mask=mask_t, other=0.0)
                gw = (gt.to(tl.float32) * w[None, :]).to(gt.dtype)
                if ALLOW_TF32:
                    sample_w = tl.dot(gw, xt, input_precision="tf32")
                else:
                    sample_w = tl.dot(gw, xt, input_precision="ieee")
        else:
            sample = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
            sample_w = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
            for t0 in range(0, T, BLOCK_T):
                rows = offs_t + (row_start + t0)
                mask_t = rows < row_end
                # g^T tile [BLOCK_P, BLOCK_T] and x tile [BLOCK_T, BLOCK_Q] of this sample's tokens.
                gt = tl.load(g_ptr + offs_p64[:, None] * stride_gp + rows[None, :] * stride_gm,
                             mask=mask_p[:, None] & mask_t[None, :], other=0.0)
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_q64[None, :] * stride_xq,
                             mask=mask_t[:, None] & mask_q[None, :], other=0.0)
                if DROPOUT:
                    xt = tl.where(keep_mask(seed, rows, offs_q, Q, dropout_p), xt, 0.0)
                if ALLOW_TF32:
                    sample = tl.dot(gt, xt, sample, input_precision="tf32")
                else:
                    sample = tl.dot(gt, xt, sample, input_precision="ieee")
                if HAS_FISHER and HAS_WEIGHT:
                    w = tl.load(w_ptr + rows * stride_w, mask=mask_t, other=0.0)
                    gw = (gt.to(tl.float32) * w[None, :]).to(gt.dtype)
                    if ALLOW_TF32:
                        sample_w = tl.dot(gw, xt, sample_w, input_precision="tf32")
                    else:
                        sample_w = tl.dot(gw, xt, sample_w, input_precision="ieee")
        grad_acc += sample
        if HAS_FISHER:
            if HAS_WEIGHT:
                per_sample = sample_w * fisher_coef
            else:
                per_sample = sample * fisher_coef
            fisher_acc += per_sample * per_sample

    mask = mask_p[:, None] & mask_q[None, :]
    grad_ptrs = grad_ptr + pid_split * stride_grad_s + offs_p64[:, None] * stride_grad_p + offs_q64[None, :] * stride_grad_q
    tl.store(grad_ptrs, (grad_acc * scale).to(grad_ptr.dtype.element_ty), mask=mask)
    if HAS_FISHER:
        f_ptrs = fisher_ptr + pid_split * stride_f_s + offs_p64[:, None] * stride_f_p + offs_q64[None, :] * stride_f_q
        if FISHER_IN_PLACE:
            old = tl.load(f_ptrs, mask=mask, other=0.0)
            tl.store(f_ptrs, old + fisher_acc, mask=mask)
        else:
            tl.store(f_ptrs, fisher_acc, mask=mask)


@triton.jit
def _weight_grad_t1_kernel(
    g_ptr, x_ptr, w_ptr, grad_ptr, fisher_ptr, seed_ptr,
    M, P, Q, rows_per_split,
    stride_gm, stride_gp, stride_xm, stride_xq, stride_w,
    stride_grad_s, stride_grad_p, stride_grad_q,
    stride_f_s, stride_f_p, stride_f_q,
    scale, fisher_coef_sq, dropout_p,
    HAS_WEIGHT: tl.constexpr, FISHER_IN_PLACE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    SQUARES_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # One token per sample: grad = g^T x and F += c^2 ((w g) o (w g))^T (x o x), one GEMM each
    # over the same tiles (see the module docstring for the derivation).
    pid_tile = tl.program_id(0)
    pid_split = tl.program_id(1)
    num_q = tl.cdiv(Q, BLOCK_Q)
    pid_p = pid_tile // num_q
    pid_q = pid_tile % num_q
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    offs_p64 = offs_p.to(tl.int64)
    offs_q64 = offs_q.to(tl.int64)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    grad_acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    fisher_acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    m_start = pid_split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = offs_m + m0
        mask_t = rows < m_end
        gt = tl.load(g_ptr + offs_p64[:, None] * stride_gp + rows[None, :] * stride_gm,
                     mask=mask_p[:, None] & mask_t[None, :], other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_q64[None, :] * stride_xq,
                     mask=mask_t[:, None] & mask_q[None, :], other=0.0)
        if DROPOUT:
            xt = tl.where(keep_mask(seed, rows, offs_q, Q, dropout_p), xt, 0.0)
        if ALLOW_TF32:
            grad_acc = tl.dot(gt, xt, grad_acc, input_precision="tf32")
        else:
            grad_acc = tl.dot(gt, xt, grad_acc, input_precision="ieee")
        gf = gt.to(tl.float32)
        if HAS_WEIGHT:
            gf = gf * tl.load(w_ptr + rows * stride_w, mask=mask_t, other=0.0)[None, :]
        xf = xt.to(tl.float32)
        fisher_acc = tl.dot(gf * gf, xf * xf, fisher_acc, input_precision=SQUARES_PRECISION)

    mask = mask_p[:, None] & mask_q[None, :]
    grad_ptrs = grad_ptr + pid_split * stride_grad_s + offs_p64[:, None] * stride_grad_p + offs_q64[None, :] * stride_grad_q
    tl.store(grad_ptrs, (grad_acc * scale).to(grad_ptr.dtype.element_ty), mask=mask)
    f_ptrs = fisher_ptr + pid_split * stride_f_s + offs_p64[:, None] * stride_f_p + offs_q64[None, :] * stride_f_q
    if FISHER_IN_PLACE:
        old = tl.load(f_ptrs, mask=mask, other=0.0)
        tl.store(f_ptrs, old + fisher_acc * fisher_coef_sq, mask=mask)
    else:
        tl.store(f_ptrs, fisher_acc * fisher_coef_sq, mask=mask)


def _pow2_block(n: int, hi: int) -> int:
    return max(16, min(hi, triton.next_power_of_2(max(n, 1))))


def _check_inputs(g, x, num_samples, fisher, token_weight) -> None:
    _check_operands("weight_grad_with_fisher", ["g", "x"], [g, x])
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"weight_grad_with_fisher: g has {g.shape[0]} tokens but x has {x.shape[0]}")
    m, p, q = g.shape[0], g.shape[1], x.shape[1]
    if fisher is not None:
        if fisher.dtype != torch.float32:
            raise TypeError(f"weight_grad_with_fisher: the Fisher buffer must be float32, got {fisher.dtype}")
        if tuple(fisher.shape) != (p, q):
            raise ValueError(f"weight_grad_with_fisher: fisher must be [{p}, {q}], got {tuple(fisher.shape)}")
        if fisher.device != g.device:
            raise ValueError(f"weight_grad_with_fisher: fisher is on {fisher.device} but g is on {g.device}")
        if m and (num_samples <= 0 or m % num_samples):
            raise ValueError(f"{m} tokens do not split into {num_samples} samples")
    if token_weight is not None:
        if token_weight.numel() != m:
            raise ValueError(
                f"weight_grad_with_fisher: token_weight has {token_weight.numel()} entries for {m} tokens"
            )
        if token_weight.device != g.device:
            raise ValueError(f"weight_grad_with_fisher: token_weight is on {token_weight.device} but g is on {g.device}")


def weight_grad_with_fisher(
    g: torch.Tensor,
    x: torch.Tensor,
    num_samples: int,
    scale: float,
    fisher: Optional[torch.Tensor] = None,
    token_weight: Optional[torch.Tensor] = None,
    fisher_scale: float = 1.0,
    *,
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
    _splits: Optional[int] = None,
) -> torch.Tensor:
    """Batch gradient ``scale * g^T drop(x)`` and, optionally, the in-place Fisher update (ALGORITHM.md §2).

    Args:
        g: ``[M, P]`` (e.g. ``s dY B`` restricted to the trainable rows, or ``dY``), any strides.
        x: ``[M, Q]`` (the adapters' input, or ``s u``), any strides; same dtype as ``g``.
        num_samples: ``N``; sample ``n`` is the contiguous block of ``T = M / N``
            rows. Only used with ``fisher`` (then ``M % N`` must be 0, else ValueError).
        scale: the factor of the gradient (the op passes pre-scaled operands and 1).
        fisher: optional float32 ``[P, Q]`` buffer (any strides, e.g. a column
            slice of a bigger buffer), updated in place:
            ``fisher += sum_n (fisher_scale * scale * g_n^T diag(w_n) drop(x)_n) ** 2``.
        token_weight: optional ``[M]`` per-token weight ``w`` of the Fisher (0 for
            padding); it does not affect the batch gradient.
        fisher_scale: turns the gradient reaching the op into a per-sample one
            (``N`` for a loss averaged over ``N`` samples).
        dropout_p, seed: with ``dropout_p > 0`` the ``x`` operand is ``drop(x)``, the mask
            of the ``[M, Q]`` input for ``seed`` (:mod:`mage_kernels.kernels.dropout`).
        _splits: testing hook forcing the number of sample splits (second grid axis).

    Returns:
        The batch gradient ``[P, Q]`` in ``g.dtype``.
    """
    _check_inputs(g, x, num_samples, fisher, token_weight)
    dropout = _check_dropout("weight_grad_with_fisher", dropout_p, seed, g.device)
    m, p = g.shape
    q = x.shape[1]
    device = g.device
    if m == 0 or p == 0 or q == 0:
        return torch.zeros((p, q), dtype=g.dtype, device=device)
    has_fisher = fisher is not None
    has_weight = has_fisher and token_weight is not None
    w = token_weight.reshape(-1).to(torch.float32) if has_weight else None
    if dropout:  # drop(x) = keep * x / (1 - p): the factor goes into the fp32 epilogue
        scale = float(scale) / (1.0 - dropout_p)
    coef = float(fisher_scale) * float(scale)

    interp = triton_interpreter()
    t = m // num_samples if has_fisher else 0
    squares = has_fisher and t == 1
    one_tile = has_fisher and 1 < t <= ONE_TILE_MAX_T
    if interp:
        block_p, block_q, block_t, warps = _pow2_block(p, 32), _pow2_block(q, 32), 16, 4
    elif squares:
        block_p = _pow2_block(p, 64)
        block_q = _pow2_block(q, 128 if block_p <= 32 else 64)
        block_t, warps = 32, 4 if block_p * block_q <= 2048 else 8
    else:
        # Four fp32 [BLOCK_P, BLOCK_Q] tiles live in registers with the Fisher (batch, Fisher,
        # sample, weighted sample): keep BLOCK_P * BLOCK_Q <= 4096 there (8 warps).
        block_p = _pow2_block(p, 64 if q <= 32 else 32)
        block_q = _pow2_block(q, 128 if block_p <= 32 else 64)
        if not has_fisher:
            block_p, block_q = _pow2_block(p, 64), _pow2_block(q, 128)
        block_t, warps = 32, 8 if block_p * block_q >= 4096 else 4
    tiles = triton.cdiv(p, block_p) * triton.cdiv(q, block_q)

    if squares:
        t_chunk = block_t  # rows are samples: split the token axis in multiples of BLOCK_M
        units = triton.cdiv(m, t_chunk)
    elif has_fisher:
        block_t = _pow2_block(t, ONE_TILE_MAX_T) if one_tile else min(block_t, _pow2_block(t, 64))
        units = num_samples  # the unit of work split over programs: a whole sample
    else:
        t = block_t * 8 if interp else 512  # rows per chunk of the plain split over tokens
        t = min(t, triton.cdiv(m, block_t) * block_t)
        units = triton.cdiv(m, t)
    if _splits is not None:
        splits = max(1, min(int(_splits), units))
    elif interp:
        splits = 1
    else:
        splits = max(1, min(units, (2 * num_sms(device)) // tiles))
    per_split = triton.cdiv(units, splits)
    splits = triton.cdiv(units, per_split)

    if splits == 1:
        grad = torch.empty((p, q), dtype=g.dtype, device=device)
        grad_ws, fisher_ws = grad, fisher
        grad_s = 0
        fisher_strides = (0, *fisher.stride()) if has_fisher else (0, 0, 0)
    else:
        grad_ws = torch.empty((splits, p, q), dtype=torch.float32, device=device)
        fisher_ws = torch.empty((splits, p, q), dtype=torch.float32, device=device) if has_fisher else None
        grad_s = grad_ws.stride(0)
        fisher_strides = fisher_ws.stride() if has_fisher else (0, 0, 0)
    grad_strides = (grad_s, grad_ws.stride(-2), grad_ws.stride(-1))
    dummy = grad_ws
    allow_tf32 = dot_allows_tf32(g.dtype)
    common = (
        g, x, w if has_weight else dummy, grad_ws, fisher_ws if has_fisher else dummy, seed if dropout else dummy,
    )
    strides = (
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), w.stride(0) if has_weight else 0,
        *grad_strides, *fisher_strides,
    )
    if squares:
        # fp32 squares: IEEE in the interpreter and for fp32 without TF32, else 3xTF32 (fp32-accurate).
        precision = "ieee" if (interp or not allow_tf32) else "tf32x3"
        launch(
            _weight_grad_t1_kernel, (tiles, splits),
            *common, m, p, q, per_split * t_chunk, *strides,
            float(scale), coef * coef, float(dropout_p),
            HAS_WEIGHT=has_weight, FISHER_IN_PLACE=splits == 1, ALLOW_TF32=allow_tf32,
            SQUARES_PRECISION=precision, DROPOUT=dropout,
            BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_M=t_chunk,
            num_warps=warps, num_stages=1 if interp else 3,
        )
    else:
        launch(
            _weight_grad_kernel, (tiles, splits),
            *common, m, p, q, t, units, per_split, *strides,
            float(scale), coef, float(dropout_p),
            HAS_FISHER=has_fisher, HAS_WEIGHT=has_weight, FISHER_IN_PLACE=splits == 1,
            ALLOW_TF32=allow_tf32, DROPOUT=dropout, ONE_TILE=one_tile,
            BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_T=block_t,
            num_warps=warps, num_stages=1 if interp else 3,
        )
    if splits == 1:
        return grad
    if has_fisher and not recording():
        fisher.add_(fisher_ws.sum(0))
    return grad_ws.sum(0).to(g.dtype)
