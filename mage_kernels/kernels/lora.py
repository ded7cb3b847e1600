"""Triton kernels of the four-adapter LoRA linear (ALGORITHM.md §1).

Three GEMM kernels; which of them a call of ``mage::lora_linear`` uses is decided
by :func:`mage_kernels.lora_op.lora_linear_path` (on CUDA the base GEMMs run in
cuBLAS and only the kernels that apply the dropout mask run here):

:func:`shrink`
    ``scale * drop(x) @ a^T`` -- the LoRA shrink ``u = s drop(x) A^T`` over all four
    adapters in ONE launch (``A = cat(A_0..A_3)`` is ``[4r, K]``, so the output is
    narrow), and in the backward ``s G = s dY B``. With ``dropout_p > 0`` the mask
    is generated in the kernel from the seed (:mod:`.dropout`), never stored.
:func:`expand_accumulate_`
    ``out += scale * drop'(g @ a)`` in place: the adapters' input gradient
    ``dx += mask / (1 - p) * (s G A)`` added into the base input-gradient
    ``dY W0`` (which cuBLAS computed), the mask regenerated from the seed.
:func:`matmul_concat_k`
    ``a1 @ b1 + scale2 * a2 @ b2 (+ bias)`` as ONE GEMM over the concatenated K:
    the forward ``[x | s u] @ [W0 | B]^T`` and the input gradient
    ``[dY | s G] @ [W0 ; A]``. The extra K2 chunk is scaled on load and
    accumulated with ``tl.dot(a, b, acc)`` into the same fp32 accumulator (no
    second accumulator: every autotune config compiles without register
    spills, see ``bench/aot_report.py``); configs whose shared memory exceeds the
    device's per-block limit are pruned before compiling. Selected only by an
    explicit ``backend="triton"`` (the cuBLAS composition is the default on CUDA).

All take operands with arbitrary strides (the op passes ``weight.t()`` and
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
from .dropout import keep_mask
from .launch import launch, sm_override

__all__ = [
    "shrink", "expand_accumulate_", "matmul_concat_k", "SUPPORTED_DTYPES", "dot_allows_tf32",
    "shared_memory_limit", "concat_k_smem_bytes", "prune_concat_k_configs", "SMEM_LIMIT_BY_CAPABILITY",
]

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
    if sm_override() is not None:  # kernels.launch.record_launches (ahead-of-time reports)
        return sm_override()
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


#: Shared memory per block (opt-in maximum, bytes) by compute capability, for ahead-of-time
#: checks without a GPU; on a GPU :func:`shared_memory_limit` asks the device.
SMEM_LIMIT_BY_CAPABILITY = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        limit = SMEM_LIMIT_BY_CAPABILITY.get(props.major * 10 + props.minor, 101376)
    return int(limit)


def shared_memory_limit(device: Optional[torch.device] = None) -> Optional[int]:
    """The per-block shared-memory limit (bytes) the launch will face; ``None`` when unknown
    (CPU tensors in the interpreter: nothing is pruned there)."""
    if device is None or device.type != "cuda":
        return None
    return _device_smem(device.index if device.index is not None else torch.cuda.current_device())


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
    scale, seed_ptr, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ALLOW_TF32: tl.constexpr, DROPOUT: tl.constexpr,
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
    if DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        if DROPOUT:  # the mask of x[m, k], regenerated from the seed (ALGORITHM.md §1)
            xt = tl.where(keep_mask(seed, offs_m, offs_k + k0, K, dropout_p), xt, 0.0)
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


def _check_dropout(fn: str, dropout_p: float, seed: Optional[torch.Tensor], device: torch.device) -> bool:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p == 0.0:
        return False
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"{fn}: dropout needs the seed as an int64 tensor of one element; got {seed!r}")
    if seed.device != device:
        raise ValueError(f"{fn}: the dropout seed is on {seed.device} but the operands are on {device}")
    return True


def shrink(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0, dropout_p: float = 0.0,
           seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale * drop(x) @ a^T`` with fp32 accumulation (the LoRA shrink ``u = s drop(x) A^T``).

    Args:
        x: ``[M, K]``, any strides.
        a: ``[R, K]``, any strides (e.g. ``lora_b.t()``). ``R`` is usually the
            small total rank ``4r`` (one tile, one launch over all adapters), but
            a wide ``R`` is tiled too.
        scale: multiplies the fp32 accumulator before the cast.
        dropout_p, seed: with ``dropout_p > 0``, ``drop(x) = keep * x / (1 - p)`` with the
            mask of :mod:`mage_kernels.kernels.dropout` for ``seed`` (int64 ``[1]``), generated
            in the kernel.

    Returns:
        ``[M, R]`` in ``x.dtype``.
    """
    _check_operands("shrink", ["x", "a"], [x, a])
    dropout = _check_dropout("shrink", dropout_p, seed, x.device)
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
        if dropout:  # Philox per element of the x tile: keep it at 16 elements per thread (no spills)
            block_m, block_k = 64, 32
        warps, stages = 4, 3
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r))
    launch(
        _shrink_kernel, grid,
        x, a, out,
        m, k, r,
        x.stride(0), x.stride(1),
        a.stride(0), a.stride(1),
        out.stride(0), out.stride(1),
        float(scale) / (1.0 - dropout_p) if dropout else float(scale),
        seed if dropout else out, float(dropout_p),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        ALLOW_TF32=dot_allows_tf32(x.dtype), DROPOUT=dropout,
        num_warps=warps, num_stages=stages,
    )
    return out


# ----------------------------------------------------------------------------- expand into an output


@triton.jit
def _expand_accumulate_kernel(
    out_ptr, g_ptr, a_ptr,
    M, K, R,
    stride_om, stride_ok, stride_gm, stride_gr, stride_ar, stride_ak,
    scale, seed_ptr, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ALLOW_TF32: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_m64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_left = R - r0
        gt = tl.load(g_ptr + offs_m64[:, None] * stride_gm + (offs_r + r0)[None, :] * stride_gr,
                     mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0)
        at = tl.load(a_ptr + (offs_r + r0)[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
                     mask=(offs_r[:, None] < r_left) & mask_k[None, :], other=0.0)
        if ALLOW_TF32:
            acc = tl.dot(gt, at, acc, input_precision="tf32")
        else:
            acc = tl.dot(gt, at, acc, input_precision="ieee")
    acc = acc * scale
    if DROPOUT:  # the same mask as the forward's shrink applied to x[m, k]
        acc = tl.where(keep_mask(tl.load(seed_ptr), offs_m, offs_k, K, dropout_p), acc, 0.0)
    mask = mask_m[:, None] & mask_k[None, :]
    out_ptrs = out_ptr + offs_m64[:, None] * stride_om + offs_k[None, :] * stride_ok
    old = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (old.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def expand_accumulate_(out: torch.Tensor, g: torch.Tensor, a: torch.Tensor, scale: float = 1.0,
                       dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out += scale * drop'(g @ a)`` in place, one rounding of ``out`` (fp32 sum, then the cast).

    The input gradient of the adapters added into the base input gradient:
    ``dx += mask / (1 - p) * (s G A)`` with ``g = s G`` ``[M, R]``, ``a = A`` ``[R, K]``
    and ``out = dx = dY W0`` ``[M, K]``. ``drop'`` multiplies element ``(m, k)`` by
    ``keep(m, k) / (1 - p)``: the mask of the forward's :func:`shrink` for the same
    ``seed`` (regenerated here, never stored). Returns ``out``.
    """
    _check_operands("expand_accumulate_", ["out", "g", "a"], [out, g, a])
    dropout = _check_dropout("expand_accumulate_", dropout_p, seed, out.device)
    m, k = out.shape
    if g.shape[0] != m or a.shape[1] != k or g.shape[1] != a.shape[0]:
        raise ValueError(
            f"expand_accumulate_: g {tuple(g.shape)} @ a {tuple(a.shape)} does not fit out {tuple(out.shape)}"
        )
    r = g.shape[1]
    if m == 0 or k == 0 or r == 0:
        return out
    block_r = _dot_block(r, hi=64)
    if triton_interpreter():
        block_m, block_k, warps = 16, 32, 4
    else:
        # Philox keeps ~10 registers per element live: 16 output elements per thread compile
        # without spills (a 64x128 tile on 4 warps, 64 per thread, spilled 9.6 KB on sm_80).
        block_m, block_k, warps = (32, 128, 8) if dropout else (64, 128, 4)
    launch(
        _expand_accumulate_kernel, (triton.cdiv(m, block_m), triton.cdiv(k, block_k)),
        out, g, a, m, k, r,
        out.stride(0), out.stride(1), g.stride(0), g.stride(1), a.stride(0), a.stride(1),
        float(scale) / (1.0 - dropout_p) if dropout else float(scale),
        seed if dropout else out, float(dropout_p),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        ALLOW_TF32=dot_allows_tf32(out.dtype), DROPOUT=dropout,
        num_warps=warps, num_stages=1 if triton_interpreter() else 2,
    )
    return out


# ----------------------------------------------------------------------------- concatenated-K GEMM


def concat_k_smem_bytes(config: triton.Config, element_bytes: int) -> int:
    """Shared memory a config's software pipeline needs: ``num_stages`` buffers of an A and a B tile.

    An upper bound of what Triton allocates for this kernel (it keeps ``num_stages`` or
    ``num_stages - 1`` buffers); ``bench/aot_report.py`` checks it against the compiled kernels."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * element_bytes


#: On sm_8x (``mma.sync``: operand fragments live in registers next to the accumulator) a config
#: whose fp32 accumulator needs more than this many registers per thread spills (AOT report:
#: 128x256 on 8 warps and 128x128 on 4 warps, 128 per thread, spilled 8-32 bytes on sm_80).
#: On sm_90 ``wgmma`` reads its operands from shared memory and 128 per thread compiles clean.
MAX_ACC_PER_THREAD = {8: 64, 9: 128}


def _acc_per_thread(config: triton.Config) -> int:
    kw = config.kwargs
    return kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * config.num_warps)


def _loads_per_thread(config: triton.Config) -> int:
    kw = config.kwargs
    return kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"]) // (32 * config.num_warps)


#: Operands whose rows are not 16-byte aligned are loaded element by element, each element with
#: its own 64-bit address: tiles loading more than this many elements per thread spill then
#: (AOT report, ragged shapes: every config but the smallest spilled 12 B - 11 KB).
MAX_UNALIGNED_LOADS_PER_THREAD = 32


def operands_aligned(tensors, element_bytes: int) -> bool:
    """Every tensor's address and non-unit strides are multiples of 16 bytes (vector loads possible)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
        if any(st != 1 and (st * element_bytes) % 16 for st in t.stride()):
            return False
    return True


def prune_concat_k_configs(configs: List[triton.Config], element_bytes: int, limit: Optional[int],
                           capability: Optional[int] = None, aligned: bool = True) -> List[triton.Config]:
    """The configs that can launch and compile without spills on this device: shared memory within
    ``limit`` bytes; for ``capability`` (e.g. 80, 90) at most :data:`MAX_ACC_PER_THREAD`
    accumulator registers per thread; for unaligned operands at most
    :data:`MAX_UNALIGNED_LOADS_PER_THREAD` loaded elements per thread. At least the smallest
    config. ``None`` skips a check. The runtime autotuner and ``bench/aot_report.py`` both prune
    with this function."""
    kept = list(configs)
    if limit is not None:
        kept = [c for c in kept if concat_k_smem_bytes(c, element_bytes) <= limit]
    if capability is not None:
        cap = MAX_ACC_PER_THREAD.get(capability // 10, MAX_ACC_PER_THREAD[9])
        kept = [c for c in kept if _acc_per_thread(c) <= cap]
    if not aligned:
        kept = [c for c in kept if _loads_per_thread(c) <= MAX_UNALIGNED_LOADS_PER_THREAD]
    return kept or [min(configs, key=lambda c: concat_k_smem_bytes(c, element_bytes))]


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _prune_concat_k_configs(configs, named_args, **kwargs):
    """``early_config_prune``: drop configs that could not launch (shared memory above the device's
    per-block limit) or would spill, so they are never compiled."""
    a1 = named_args["a1_ptr"]
    if not isinstance(a1, torch.Tensor) or a1.device.type != "cuda":
        return configs
    index = a1.device.index if a1.device.index is not None else torch.cuda.current_device()
    return prune_concat_k_configs(configs, a1.element_size(), shared_memory_limit(a1.device), _capability(index),
                                  _aligned_args(named_args, a1.element_size()))


def _aligned_args(named_args, element_bytes: int) -> bool:
    """Alignment of the concat-K operands from the kernel's named arguments (pointers and strides)."""
    if any(isinstance(named_args[k], torch.Tensor) and named_args[k].data_ptr() % 16
           for k in ("a1_ptr", "b1_ptr", "a2_ptr", "b2_ptr")):
        return False
    strides = [v for k, v in named_args.items() if k.startswith("stride_") and k != "stride_bias"]
    return all(st == 1 or (st * element_bytes) % 16 == 0 for st in strides if isinstance(st, int))


def _concat_k_configs() -> List[triton.Config]:
    """Autotune space: H100-sized tiles on GPU, one small tile in the interpreter.

    Every config compiles without spills for sm_80 and sm_90 under triton 3.6 and 3.9 once
    :func:`prune_concat_k_configs` has dropped the ones that cannot (bench/results/aot_*):
    64x128x64 on 4 warps spilled 4 bytes on sm_80 under triton 3.6 and was removed, and
    128x64x64 runs 3 stages instead of 4 for the same reason."""
    if triton_interpreter():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    configs = []
    for bm, bn, bk, warps, stages in (
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 3),
        (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 2),
    ):
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                     num_warps=warps, num_stages=stages))
    return configs


@triton.autotune(configs=_concat_k_configs(), key=["M_BUCKET", "N", "K1", "K2"],
                 prune_configs_by={"early_config_prune": _prune_concat_k_configs})
@triton.jit
def _matmul_concat_k_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2, M_BUCKET,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_bias, stride_om, stride_on,
    scale2,
    HAS_A2: tl.constexpr, SCALE_A2: tl.constexpr, HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
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
    # K2: the adapters' chunk of the concatenated K (s*u @ B^T, or s*G @ A), accumulated
    # into the SAME accumulator. The op passes u and G pre-scaled (scale2 = 1); any other
    # scale2 multiplies the a2 tile on load (one rounding to the operand dtype). A second
    # fp32 accumulator here (part = dot(..); acc += s * part) made 3 of the 7 configs spill.
    if HAS_A2:
        a_ptrs = a2_ptr + offs_m64[:, None] * stride_a2m + offs_k[None, :] * stride_a2k
        b_ptrs = b2_ptr + offs_k[:, None] * stride_b2k + offs_n64[None, :] * stride_b2n
        for k0 in range(0, K2, BLOCK_K):
            k_left = K2 - k0
            at = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            if SCALE_A2:
                at = (at.to(tl.float32) * scale2).to(at.dtype)
            bt = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            if ALLOW_TF32:
                acc = tl.dot(at, bt, acc, input_precision="tf32")
            else:
                acc = tl.dot(at, bt, acc, input_precision="ieee")
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
        scale2: factor of the ``a2 @ b2`` part; applied to the ``a2`` tile on load (the op
            passes a pre-scaled ``s u`` / ``s G`` and ``scale2 = 1``).
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
    launch(
        _matmul_concat_k_kernel, grid,
        a1, b1,
        a2 if has_a2 else dummy, b2 if has_a2 else dummy,
        bias if bias is not None else dummy, out,
        m, n, k1, k2 if has_a2 else 0, triton.next_power_of_2(m),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0) if has_a2 else 0, a2.stride(1) if has_a2 else 0,
        b2.stride(0) if has_a2 else 0, b2.stride(1) if has_a2 else 0,
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        float(scale2),
        HAS_A2=has_a2, SCALE_A2=has_a2 and float(scale2) != 1.0, HAS_BIAS=bias is not None,
        ALLOW_TF32=dot_allows_tf32(a1.dtype),
    )
    return out
