"""Triton kernels of the four-adapter LoRA linear (SPEC section 1).

Two GEMM kernels make up the whole forward and the input-gradient of
``mage::lora_linear`` (:mod:`mage_kernels.lora_op`):

:func:`shrink`
    ``scale * x @ a^T`` -- the LoRA shrink ``u = x A^T`` over all four adapters in
    ONE launch (``A = cat(A_0..A_3)`` is ``[4r, K]``, so the output is narrow),
    and in the backward ``G = dY B``. Each program owns a ``[BLOCK_M, BLOCK_R]``
    output tile and walks K; for the usual small rank the whole ``R`` is one tile.
:func:`matmul_concat_k`
    ``a1 @ b1 + scale2 * a2 @ b2 (+ bias)`` as ONE GEMM over the concatenated K:
    the forward ``[x | s u] @ [W0 | B]^T`` and the input gradient
    ``[dY | s G] @ [W0 ; A]``. Each program walks K1 (the base weight) and then
    the short extra K2 chunk (the adapters) into the same fp32 accumulator, and
    adds the bias in the epilogue, so the LoRA expand costs no extra pass over
    the output.

Both take operands with arbitrary strides (the op passes ``weight.t()`` and
``lora_b.t()`` views), accumulate in fp32 and return ``x.dtype`` / ``a1.dtype``.
Supported dtypes: float16, bfloat16, float32 (float32 uses TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` allows it, like ``torch.matmul``);
anything else raises :class:`TypeError`. Semantics are exactly those of the
same-named functions in :mod:`mage_kernels.reference`.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreter

__all__ = ["shrink", "matmul_concat_k", "SUPPORTED_DTYPES", "dot_allows_tf32"]

#: dtypes the Triton GEMMs accept (``tl.dot`` operands).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- input checks


def _check_operands(fn: str, names: List[str], tensors: List[torch.Tensor]) -> None:
    """Clear errors for what the kernels cannot take: bad rank, dtype or device."""
    first = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype}; the Triton kernels support "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)} (use the 'torch' backend for others)"
            )
        if t.dtype != first.dtype:
            raise TypeError(f"{fn}: {name} is {t.dtype} but {names[0]} is {first.dtype}; cast them to one dtype")
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {names[0]} is on {first.device}")


def dot_allows_tf32(dtype: torch.dtype) -> bool:
    """``tl.dot`` precision flag: full IEEE fp32 for float32 operands unless torch allows TF32
    (``torch.backends.cuda.matmul.allow_tf32``); half-precision operands use the tensor cores as is."""
    return dtype != torch.float32 or bool(torch.backends.cuda.matmul.allow_tf32)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): sizes grids to fill the GPU."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _dot_block(n: int, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two block covering ``n`` (at least 16, the ``tl.dot`` minimum)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


# ----------------------------------------------------------------------------- shrink


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_om, stride_or,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    # a^T tile [BLOCK_K, BLOCK_R] read straight from a [R, K] with its own strides.
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :].to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        at = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
        if ALLOW_TF32:
            acc = tl.dot(xt, at, acc, input_precision="tf32")
        else:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    acc = acc * scale
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


def shrink(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x @ a^T`` with fp32 accumulation (the LoRA shrink ``u = x A^T``).

    Args:
        x: ``[M, K]``, any strides.
        a: ``[R, K]``, any strides (e.g. ``lora_b.t()``). ``R`` is usually the
            small total rank ``4r`` (one tile, one launch over all adapters), but
            a wide ``R`` is tiled too (the op also uses it for ``s * G A``).
        scale: multiplies the fp32 accumulator before the cast.

    Returns:
        ``[M, R]`` in ``x.dtype``.
    """
    _check_operands("shrink", ["x", "a"], [x, a])
    m, k = x.shape
    r, ka = a.shape
    if ka != k:
        raise ValueError(f"shrink: x is [{m}, {k}] but a is [{r}, {ka}]; their last dimensions must match")
    out = torch.empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0 or r == 0:
        return out
    if k == 0:
        return out.zero_()
    block_r = _dot_block(r)
    if triton_interpreter():
        block_m, block_k, warps, stages = 16, 32, 4, 1
    else:
        # Enough row tiles to fill the GPU twice over; 128-row tiles only when there are plenty.
        block_m = 128 if triton.cdiv(m, 128) * triton.cdiv(r, block_r) >= 2 * num_sms(x.device) else 64
        block_k = 64 if block_r <= 64 else 32
        warps, stages = 4, 3
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r))
    _shrink_kernel[grid](
        x, a, out,
        m, k, r,
        x.stride(0), x.stride(1),
        a.stride(0), a.stride(1),
        out.stride(0), out.stride(1),
        float(scale),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        ALLOW_TF32=dot_allows_tf32(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out


# ----------------------------------------------------------------------------- concatenated-K GEMM


def _concat_k_configs() -> List[triton.Config]:
    """Autotune space: H100-sized tiles on GPU, one small tile in the interpreter."""
    if triton_interpreter():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    configs = []
    for bm, bn, bk, warps, stages in (
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ):
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=warps, num_stages=stages))
    return configs


@triton.autotune(configs=_concat_k_configs(), key=["M_BUCKET", "N", "K1", "K2"])
@triton.jit
def _matmul_concat_k_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2, M_BUCKET,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_bias, stride_om, stride_on,
    scale2,
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ("swizzled") program order: GROUP_M row-tiles share each column
    # tile of b1 while it is hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_rows)
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K1: the base GEMM (x @ W0^T, or dY @ W0).
    a_ptrs = a1_ptr + offs_m64[:, None] * stride_a1m + offs_k[None, :] * stride_a1k
    b_ptrs = b1_ptr + offs_k[:, None] * stride_b1k + offs_n64[None, :] * stride_b1n
    for k0 in range(0, K1, BLOCK_K):
        k_left = K1 - k0
        at = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        bt = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if ALLOW_TF32:
            acc = tl.dot(at, bt, acc, input_precision="tf32")
        else:
            acc = tl.dot(at, bt, acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_a1k
        b_ptrs += BLOCK_K * stride_b1k
    # K2: the adapters' chunk of the concatenated K (s*u @ B^T, or s*G @ A),
    # scaled in fp32 so a float16 u is never rounded after the scaling.
    if HAS_A2:
        a_ptrs = a2_ptr + offs_m64[:, None] * stride_a2m + offs_k[None, :] * stride_a2k
        b_ptrs = b2_ptr + offs_k[:, None] * stride_b2k + offs_n64[None, :] * stride_b2n
        for k0 in range(0, K2, BLOCK_K):
            k_left = K2 - k0
            at = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            bt = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            if ALLOW_TF32:
                part = tl.dot(at, bt, input_precision="tf32")
            else:
                part = tl.dot(at, bt, input_precision="ieee")
            acc += scale2 * part
            a_ptrs += BLOCK_K * stride_a2k
            b_ptrs += BLOCK_K * stride_b2k
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n64 * stride_bias, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_n64[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def matmul_concat_k(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: Optional[torch.Tensor] = None,
    b2: Optional[torch.Tensor] = None,
    scale2: float = 1.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``a1 @ b1 + scale2 * (a2 @ b2) (+ bias)`` in ONE kernel over the concatenated K.

    Args:
        a1: ``[M, K1]`` (``x`` or ``dY``), any strides.
        b1: ``[K1, N]`` (``W0^T`` or ``W0``), any strides.
        a2, b2: the optional extra K chunk ``[M, K2]`` / ``[K2, N]`` (``u`` and
            ``B^T``, or ``G`` and ``A``); both or neither.
        scale2: the LoRA scaling ``s`` applied to the ``a2 @ b2`` part (in fp32).
        bias: optional ``[N]`` added in the epilogue.

    Returns:
        ``[M, N]`` in ``a1.dtype``.
    """
    if (a2 is None) != (b2 is None):
        raise ValueError("matmul_concat_k: pass both a2 and b2, or neither")
    names, tensors = ["a1", "b1"], [a1, b1]
    if a2 is not None:
        names += ["a2", "b2"]
        tensors += [a2, b2]
    _check_operands("matmul_concat_k", names, tensors)
    m, k1 = a1.shape
    k1b, n = b1.shape
    if k1b != k1:
        raise ValueError(f"matmul_concat_k: a1 is [{m}, {k1}] but b1 is [{k1b}, {n}]; inner dimensions must match")
    k2 = 0
    if a2 is not None:
        m2, k2 = a2.shape
        k2b, n2 = b2.shape
        if m2 != m or k2b != k2 or n2 != n:
            raise ValueError(
                f"matmul_concat_k: a2 {tuple(a2.shape)} @ b2 {tuple(b2.shape)} does not fit a1 @ b1 = [{m}, {n}]"
            )
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != n:
            raise ValueError(f"matmul_concat_k: bias must be [{n}], got shape {tuple(bias.shape)}")
        if bias.device != a1.device:
            raise ValueError(f"matmul_concat_k: bias is on {bias.device} but a1 is on {a1.device}")
        if bias.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"matmul_concat_k: bias has unsupported dtype {bias.dtype}")
    out = torch.empty((m, n), dtype=a1.dtype, device=a1.device)
    if m == 0 or n == 0:
        return out
    has_a2 = a2 is not None and k2 > 0
    dummy = out  # never read: the constexpr flags compile the loads away
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _matmul_concat_k_kernel[grid](
        a1, b1,
        a2 if has_a2 else dummy, b2 if has_a2 else dummy,
        bias if bias is not None else dummy, out,
        m, n, k1, k2 if has_a2 else 0, triton.next_power_of_2(m),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0) if has_a2 else 0, a2.stride(1) if has_a2 else 0,
        b2.stride(0) if has_a2 else 0, b2.stride(1) if has_a2 else 0,
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        float(scale2),
        HAS_A2=has_a2, HAS_BIAS=bias is not None, ALLOW_TF32=dot_allows_tf32(a1.dtype),
    )
    return out
