"""Fused multi-tensor PEMA update in Triton (SPEC section 3).

One launch updates every EMA tensor of a dtype group. The Python wrapper
builds two small int64 tables on the device:

* a **tensor table** ``[num_tensors, 5]``: the addresses of ``theta``,
  ``theta*``, ``g`` and ``F`` and the element count of each tensor;
* a **chunk table** ``[num_chunks, 2]``: for every program, the tensor it works
  on and the first element of its chunk (``CHUNK = BLOCK * BLOCKS_PER_PROGRAM``
  elements, the tensor's tail chunk is ragged and masked).

Each program turns the addresses back into typed pointers (pointer tables work
on the GPU and under ``TRITON_INTERPRET=1``), streams its chunk once (read
``theta, theta*, g, F``; write ``theta*``), and adds its two counts (fallback
elements, non-finite skips) into the int64 ``counts[2]`` with one atomic each.
Because a pointer's element type is a compile-time constant, tensors are
grouped by their ``(theta, theta*, g, F)`` dtypes: ONE launch per dtype group
(in practice one group: all adapters share a dtype). The chunk table is cached
by the tensors' sizes and the tensor table by their addresses, so a training
loop that keeps its buffers rebuilds nothing; a new address (e.g. a fresh ``F``
tensor) costs one small host-to-device copy of the tensor table, never a sync
on results.

Per element, in float32 (float64 when ``theta`` is float64)::

    beta   = (g + 1) / (F * (theta - theta*) + lam)
    beta   = beta if 0 < beta < 1 else beta_fallback      (NaN / inf fall back; counted)
    new    = beta * theta* + (1 - beta) * theta
    theta* = new if new is finite else theta*              (counted; theta* never turns NaN)

This is the diagonal, elementwise form of the paper's Eq. 3-4 with the
fallback: the project's documented design decision (SPEC section 3).
The reference is :func:`mage_kernels.reference.pema_update_`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["pema_update_"]

BLOCK = 1024
BLOCKS_PER_PROGRAM = 4
CHUNK = BLOCK * BLOCKS_PER_PROGRAM

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
_FINITE_MAX = {tl.float32: 3.4028234663852886e38, tl.float64: 1.7976931348623157e308}


@triton.jit
def _pema_kernel(
    tensor_table,  # int64 [num_tensors, 5]: theta, theta*, g, F addresses; numel
    chunk_table,  # int64 [num_chunks, 2]: tensor index, first element
    counts,  # int64 [2]: fallback elements, non-finite skips
    lam,
    beta_fallback,
    P_DT: tl.constexpr,
    E_DT: tl.constexpr,
    G_DT: tl.constexpr,
    F_DT: tl.constexpr,
    C_DT: tl.constexpr,  # compute dtype
    FINITE_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(chunk_table + 2 * pid)
    start = tl.load(chunk_table + 2 * pid + 1)
    row = tensor_table + 5 * t
    p_ptr = tl.load(row).to(tl.pointer_type(P_DT))
    e_ptr = tl.load(row + 1).to(tl.pointer_type(E_DT))
    g_ptr = tl.load(row + 2).to(tl.pointer_type(G_DT))
    f_ptr = tl.load(row + 3).to(tl.pointer_type(F_DT))
    n = tl.load(row + 4)
    n_fallback = tl.zeros([BLOCK], dtype=tl.int32)
    n_nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(BLOCKS_PER_PROGRAM):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        p = tl.load(p_ptr + offs, mask=m, other=0.0).to(C_DT)
        e = tl.load(e_ptr + offs, mask=m, other=0.0).to(C_DT)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(C_DT)
        f = tl.load(f_ptr + offs, mask=m, other=0.0).to(C_DT)
        beta = (g + 1.0) / (f * (p - e) + lam)
        ok = (beta > 0.0) & (beta < 1.0)  # False for NaN
        beta = tl.where(ok, beta, beta_fallback)
        new = beta * e + (1.0 - beta) * p
        finite = tl.abs(new) <= FINITE_MAX  # False for NaN and +-inf
        tl.store(e_ptr + offs, new.to(E_DT), mask=m & finite)
        n_fallback += (m & (ok == 0)).to(tl.int32)
        n_nonfinite += (m & (finite == 0)).to(tl.int32)
    tl.atomic_add(counts, tl.sum(n_fallback, axis=0).to(tl.int64))
    tl.atomic_add(counts + 1, tl.sum(n_nonfinite, axis=0).to(tl.int64))


# Small LRU caches: the chunk table depends only on the tensors' sizes (stable over a
# training run); the tensor table on their addresses (stable while the buffers live).
_CHUNK_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_TENSOR_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 8


def _cached(cache: "OrderedDict[tuple, torch.Tensor]", key: tuple, build) -> torch.Tensor:
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = cache[key] = build()
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _chunk_table(device: torch.device, numels: Tuple[int, ...]) -> torch.Tensor:
    """int64 ``[num_chunks, 2]``: (tensor index, first element) for every program, built vectorized."""
    n = torch.tensor(numels, dtype=torch.int64)
    per = (n + CHUNK - 1) // CHUNK
    idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), per)
    first = torch.cumsum(per, 0) - per  # first chunk of each tensor
    start = (torch.arange(idx.numel(), dtype=torch.int64) - first[idx]) * CHUNK
    return torch.stack([idx, start], 1).contiguous().to(device)


def _tables(device: torch.device, group: List[Tuple[torch.Tensor, ...]]) -> Tuple[torch.Tensor, torch.Tensor]:
    numels = tuple(e.numel() for _, e, _, _ in group)
    ptrs = tuple(t.data_ptr() for quad in group for t in quad)
    ct = _cached(_CHUNK_CACHE, (str(device),) + numels, lambda: _chunk_table(device, numels))

    def build_tensor_table() -> torch.Tensor:
        rows = [list(ptrs[4 * i: 4 * i + 4]) + [numels[i]] for i in range(len(numels))]
        return torch.tensor(rows, dtype=torch.int64).to(device)

    tt = _cached(_TENSOR_CACHE, (str(device),) + ptrs + numels, build_tensor_table)
    return tt, ct


def pema_update_(
    params: Sequence[torch.Tensor],
    emas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float = 1e-5,
    beta_fallback: float = 0.99,
) -> torch.Tensor:
    """Triton twin of :func:`mage_kernels.reference.pema_update_` (in place on ``emas``).

    Inputs are validated by the caller (:func:`mage_kernels.ema.pema_update_`):
    equal lengths and shapes, one device, contiguous ``emas``. ``params``,
    ``grads`` and ``fishers`` are made contiguous here when they are not.
    Returns ``int64[2]`` on the device: (fallback elements, non-finite skips).
    """
    device = emas[0].device if len(emas) else torch.device("cpu")
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    groups: Dict[tuple, List[Tuple[torch.Tensor, ...]]] = {}
    keep_alive = []  # contiguous copies must outlive the launch
    for p, e, g, f in zip(params, emas, grads, fishers):
        if e.numel() == 0:
            continue
        p, g, f = (t if t.is_contiguous() else t.contiguous() for t in (p, g, f))
        keep_alive.append((p, g, f))
        groups.setdefault((p.dtype, e.dtype, g.dtype, f.dtype), []).append((p, e, g, f))
    for (pd, ed, gd, fd), group in groups.items():
        tt, ct = _tables(device, group)
        cdt = tl.float64 if tl.float64 in (_TL_DTYPES[pd], _TL_DTYPES[ed]) else tl.float32
        _pema_kernel[(ct.shape[0],)](
            tt, ct, counts, float(lam), float(beta_fallback),
            P_DT=_TL_DTYPES[pd], E_DT=_TL_DTYPES[ed], G_DT=_TL_DTYPES[gd], F_DT=_TL_DTYPES[fd],
            C_DT=cdt, FINITE_MAX=_FINITE_MAX[cdt],
            BLOCK=BLOCK, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
        )
    del keep_alive
    return counts
